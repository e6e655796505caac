"""The process a python grader runs in: `python -P python_child.py`, JSON in on stdin, JSON out.

Standard library only, and no rayft import: it starts in well under a second and never loads
the trainer's modules. Request: {"source": str, "pairs": [[sample, item], ...]}. Answer:
{"results": [{"score": float} | {"error": str}, ...]}, or {"fatal": str} when the source itself
fails to run (then every sample fails).
"""

import json
import math
import numbers
import os
import sys


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def _one(grade, sample, item) -> dict:
    try:
        value = grade(sample, item)
    except BaseException as e:  # SystemExit too: one sample's sys.exit() must not end the batch
        return {"error": _reason(e)}
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return {"error": f"grade returned {type(value).__name__} {value!r:.80}, not a number"}
    if not math.isfinite(float(value)):
        return {"error": f"grade returned {float(value)}, not a finite number"}
    return {"score": float(value)}


def main() -> None:
    request = json.load(sys.stdin)
    # The answer goes to a copy of stdout; fd 1 itself now points at stderr, so a grader that
    # prints (from Python or from C) cannot corrupt the JSON.
    answer_to = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    namespace = {"__name__": "grader"}
    try:
        exec(compile(request["source"], "<grader source>", "exec"), namespace)
        grade = namespace["grade"]
    except BaseException as e:
        answer = {"fatal": _reason(e)}
    else:
        answer = {"results": [_one(grade, s, i) for s, i in request["pairs"]]}
    json.dump(answer, answer_to)
    answer_to.flush()


if __name__ == "__main__":
    main()
