"""Exact and near-duplicate detection across all input files.

Signatures (content hash and MinHash) are computed where the rows are, in Ray Data batches;
the decision is global and runs on the driver over (source, id, signature) triples. We chose
the driver over a distributed groupby because near-duplicates are not transitive buckets: a
row is a duplicate of an earlier *kept* row, which is a sequential decision over LSH
candidates. The driver holds ~1 KiB per row (128 x uint64), i.e. ~1 GiB per million rows,
which is the scale this stage targets; beyond that, band the signatures and shard by band.
"""

from __future__ import annotations

import functools
import hashlib
import re

import numpy as np
from datasketch import MinHash, MinHashLSH

# Pinned so signatures made on workers and rebuilt on the driver always agree (datasketch >= 2).
SCHEME = "affine32"
_WORD = re.compile(r"\w+", re.UNICODE)


def exact_key(parts: list[tuple[str, str]]) -> str:
    """What counts as 'the same content': every (role, text) part, whitespace runs collapsed.

    Case and punctuation are kept: '{"category": "billing"}' and 'Category: billing' teach
    different outputs, so rows that differ only there are both worth keeping.
    """
    return "\x1f".join(f"{role} {' '.join(text.split())}" for role, text in parts)


def near_key(parts: list[tuple[str, str]]) -> str:
    """What near-duplicate similarity is measured on: the case-folded words of every part but
    the system prompt. A long system prompt shared by a whole dataset would otherwise dominate
    the shingles, and templated rows that differ in their facts (names, order numbers, days)
    would look like copies of each other."""
    return "\x1f".join(
        f"{role} {' '.join(_WORD.findall(text.casefold()))}"
        for role, text in parts
        if role != "system"
    )


def content_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def shingles(key: str, size: int) -> list[bytes]:
    words = key.replace("\x1f", " ").split()
    if len(words) <= size:
        return [" ".join(words).encode()]
    return [" ".join(words[i : i + size]).encode() for i in range(len(words) - size + 1)]


@functools.lru_cache(maxsize=4)
def _empty(num_perm: int) -> MinHash:
    # Building a MinHash draws its permutations, which costs more than hashing a row: copy one.
    return MinHash(num_perm=num_perm, seed=1, scheme=SCHEME)


def signature(key: str, num_perm: int, shingle_size: int) -> bytes:
    """MinHash of the word shingles, as bytes (num_perm little-endian uint64)."""
    m = _empty(num_perm).copy()
    m.update_batch(shingles(key, shingle_size))
    return m.hashvalues.astype("<u8").tobytes()


def find_duplicates(
    rows: list[tuple[str, str, bytes | None]],
    near: bool,
    threshold: float,
    num_perm: int,
    exact_dedupe: bool = True,
) -> tuple[set[str], set[str]]:
    """Sources to drop as (exact, near) duplicates; `rows` = (source, id, signature) in
    priority order: the first occurrence is kept, later copies go."""
    seen: set[str] = set()
    exact: set[str] = set()
    survivors = []
    for source, cid, sig in rows:
        if exact_dedupe and cid in seen:
            exact.add(source)
        else:
            seen.add(cid)
            survivors.append((source, sig))
    near_dups: set[str] = set()
    if not near or not survivors:
        return exact, near_dups
    # All survivors' signatures in one matrix: a row's LSH candidates are confirmed with one
    # comparison of their rows, not one numpy call per candidate.
    hvs = np.frombuffer(b"".join(sig for _, sig in survivors), dtype="<u8").reshape(-1, num_perm)
    # Band for a lower threshold than asked: LSH misses many pairs just above its own threshold,
    # and every candidate is confirmed against `threshold` below anyway.
    keys_of = band_keys(hvs, max(0.3, threshold - 0.2))
    buckets: list[dict[int, list[int]]] = [{} for _ in range(keys_of.shape[1])]
    for k, keys in enumerate(keys_of.tolist()):
        # Earlier kept rows that share a band with this one: LSH candidates, probable matches
        # only; confirmed with the signatures' own similarity estimate.
        shared = zip(buckets, keys, strict=True)
        candidates = list({c for band, key in shared for c in band.get(key, ())})
        if candidates and (hvs[candidates] == hvs[k]).mean(axis=1).max() >= threshold:
            near_dups.add(survivors[k][0])
            continue
        for band, key in zip(buckets, keys, strict=True):
            band.setdefault(key, []).append(k)
    return exact, near_dups


def band_keys(hvs: np.ndarray, threshold: float) -> np.ndarray:
    """One 64-bit key per (row, LSH band): the bands datasketch's MinHashLSH picks for
    `threshold`, each hashed in one vectorised pass (its own per-row bytes-keyed tables cost
    most of dedupe's time on the driver). Rows that share a band share its key; two bands that
    merely collide only add a candidate, which the caller confirms anyway."""
    lsh = MinHashLSH(threshold=threshold, num_perm=hvs.shape[1])
    bands = hvs[:, : lsh.b * lsh.r].reshape(len(hvs), lsh.b, lsh.r)
    mix = np.random.default_rng(0).integers(1, 2**63, size=lsh.r, dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):  # multiply-add modulo 2**64, as intended
        return (bands * mix).sum(axis=2, dtype=np.uint64)
