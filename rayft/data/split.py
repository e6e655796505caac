"""Deterministic train/validation/test assignment by a stable hash of the content id.

Hashing the content (not the row position) makes the split independent of file order and
parallelism, and puts identical content into the same split, so no duplicate can cross splits.
"""

from __future__ import annotations

import hashlib


def assign(cid: str, validation: float, test: float, seed: int) -> str:
    """`train`, `validation` or `test` for content id `cid`."""
    digest = hashlib.sha256(f"{seed}:{cid}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test:
        return "test"
    if u < test + validation:
        return "validation"
    return "train"
