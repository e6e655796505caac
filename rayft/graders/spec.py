"""Reading a grader's JSON: each field is checked where it is read, and an error names its path.

Unknown fields are refused rather than ignored: a misspelt `pass_treshold` would otherwise
leave a grader silently different from the one its author wrote.
"""

from __future__ import annotations

import math
from typing import Any

from rayft.errors import RayftError


class GraderError(RayftError):
    """A grader spec that cannot be built; the message names the field's path."""


class SampleError(Exception):
    """A problem with one sample (a missing item field, an unparsable reply): that sample
    scores 0 with this message as its error; the rest of the batch is graded."""


def check_fields(spec: Any, where: str, required: set[str], optional: set[str]) -> dict:
    if not isinstance(spec, dict):
        raise GraderError(f"{where}: a grader is a JSON object, got {type(spec).__name__}")
    missing = sorted(required - spec.keys())
    if missing:
        raise GraderError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(spec.keys() - required - optional)
    if unknown:
        known = ", ".join(sorted(required | optional))
        raise GraderError(
            f"{where}.{unknown[0]}: not a field of a {spec.get('type')} grader (its fields: {known})"
        )
    return spec


def text(spec: dict, key: str, where: str, default: str | None = None) -> str:
    value = spec.get(key, default)
    if not isinstance(value, str) or not value:
        raise GraderError(f"{where}.{key}: must be a non-empty string, got {value!r}")
    return value


def texts(spec: dict, key: str, where: str) -> list[str]:
    value = spec.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise GraderError(f"{where}.{key}: must be a non-empty list of strings, got {value!r}")
    return value


def number(spec: dict, key: str, where: str, default: float | None = None) -> float | None:
    value = spec.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise GraderError(f"{where}.{key}: must be a finite number, got {value!r}")
    return float(value)


def positive(spec: dict, key: str, where: str, default: float) -> float:
    value = number(spec, key, where, default)
    if value <= 0:
        raise GraderError(f"{where}.{key}: must be > 0, got {value!r}")
    return value


def one_of(spec: dict, key: str, where: str, choices: tuple[str, ...]) -> str:
    value = spec.get(key)
    if value not in choices:
        raise GraderError(f"{where}.{key}: {value!r} is not one of {', '.join(choices)}")
    return value
