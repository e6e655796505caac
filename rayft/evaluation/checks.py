"""Task checks from `eval.checks`: does an answer have the shape the task asks for?"""

from __future__ import annotations

import json
import re

from rayft.config import CheckConfig


def run_check(check: CheckConfig, answer: str) -> bool:
    if check.kind == "regex":
        return re.search(check.pattern or "", answer) is not None
    if check.kind == "contains":
        return (check.pattern or "") in answer
    # json_keys: the whole answer must be one JSON object; text around it fails the check,
    # because a caller parsing the reply would fail too.
    try:
        obj = json.loads(answer.strip())
    except ValueError:
        return False
    return isinstance(obj, dict) and all(k in obj for k in check.keys)
