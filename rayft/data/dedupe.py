"""Exact and near-duplicate detection across all input files.

Signatures (content hash, MinHash and content fingerprint) are computed where the rows are, in
Ray Data batches; the decision is global and runs on the driver over (source, id, signature)
triples. We chose the driver over a distributed groupby because near-duplicates are not
transitive buckets: a row is a duplicate of an earlier *kept* row, which is a sequential
decision over LSH candidates. The driver holds ~1 KiB per row (128 x uint64, and the 8-byte
fingerprint), i.e. ~1 GiB per million rows, which is the scale this stage targets; beyond
that, band the signatures and shard by band (or by fingerprint: a near-duplicate has its
original's).

A near-duplicate is a row whose MinHash estimate of word-shingle Jaccard similarity with an
earlier kept row reaches the threshold *and* whose content words are the same, in the same
order (`content_fingerprint`). Similarity alone removed rows that differ in one fact: at 0.9,
"refund order A123456 for my blender" and the same ticket for a kettle, or for order A123457,
or one that says "does not" for "does", are templated rows with different facts. So only case,
spacing, punctuation and a few filler words (`FILLER`) may differ between a row and its
near-duplicate; a changed number, name, product, negation, intent or misspelt word keeps both.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasketch import MinHash, MinHashLSH
from datasketch.minhash import _fmix

# Pinned so signatures made on workers and rebuilt on the driver always agree (datasketch >= 2).
SCHEME = "affine32"
# A word is a run of letters, digits and underscores (Python's \w, in RE2's terms).
_NOT_WORD = r"[^\p{L}\p{N}_]+"
_WORD_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: the word hash's polynomial constant
# Apostrophes go before the split: "don't" and "dont", retyped, are one word (elsewhere an
# apostrophe splits nothing a space would not).
_APOSTROPHE = "['\u2019\u02bc]"
# Words a copy may add, drop or swap without saying anything else: articles, greetings,
# politeness, intensifiers and first- and second-person pronouns. Not negations, numbers,
# names, prepositions or verbs: those change what a support row says.
FILLER = ("a", "an", "the", "hi", "hello", "hey", "dear", "please", "pls", "plz", "thanks", "thank",
          "thx", "you", "your", "yours", "i", "im", "am", "me", "my", "we", "us", "our", "so",
          "just", "really", "very", "much", "also", "ok", "okay", "oh")  # fmt: skip


def exact_key(parts: list[tuple[str, str]]) -> str:
    """What counts as 'the same content': every (role, text) part, whitespace runs collapsed.

    Case and punctuation are kept: '{"category": "billing"}' and 'Category: billing' teach
    different outputs, so rows that differ only there are both worth keeping.
    """
    return "\x1f".join(f"{role} {' '.join(text.split())}" for role, text in parts)


def near_key(parts: list[tuple[str, str]]) -> str:
    """What near-duplicate similarity is measured on: every part but the system prompt, whose
    words (`signatures` lower-cases them and takes the runs of letters, digits and
    underscores) make the shingles. A long system prompt shared by a whole dataset would
    otherwise dominate the shingles, and templated rows that differ in their facts (names,
    order numbers, days) would look like copies of each other."""
    return "\x1f".join(f"{role} {text}" for role, text in parts if role != "system")


def content_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def _empty(num_perm: int) -> MinHash:
    # Its permutations are drawn once per num_perm (every process draws the same ones).
    return MinHash(num_perm=num_perm, seed=1, scheme=SCHEME)


@functools.lru_cache(maxsize=8)
def _odd_multipliers(count: int, seed: int) -> np.ndarray:
    # Fixed odd 64-bit constants for multiply-add hashes: every process hashes alike.
    drawn = np.random.default_rng(seed).integers(1, 2**63, size=count, dtype=np.uint64)
    return drawn | np.uint64(1)


def shingle_hashes(words: np.ndarray, lengths: np.ndarray, size: int) -> np.ndarray:
    """32-bit hashes of the word shingles of rows given as their words' hashes (`words`, all
    rows one after the other, `lengths` words each): one per `size` consecutive words of a row,
    or one of all its words when it has no more than `size`. A shingle's hash is its words'
    hashes multiplied by their place's odd constant, added modulo 2**64, top 32 bits."""
    count = np.maximum(lengths - size + 1, 1)  # shingles of each row
    row_start = np.cumsum(lengths) - lengths
    row = np.repeat(np.arange(len(lengths)), count)
    start = row_start[row] + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
    total = np.zeros(len(start), dtype=np.uint64)
    padded = np.append(words, np.uint64(0))  # places past a short row's end read this
    mix = _odd_multipliers(size, seed=size)  # one for each word place in a shingle
    with np.errstate(over="ignore"):  # multiply-add modulo 2**64, as intended
        for j in range(size):
            inside = j < lengths[row]
            total += padded[np.where(inside, start + j, len(words))] * mix[j]
    return total >> np.uint64(32)


def words(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The 64-bit hashes of the lower-cased words of every key (apostrophes dropped), all keys
    one after the other, and the number of words of each key. Arrow lower-cases, drops the
    apostrophes and splits every key in one call each, and numpy hashes every word's UTF-8
    bytes at once (a polynomial in a fixed odd constant modulo 2**64, then mixed): a Python
    regex and a CRC-32 call a word were most of the cost of signing a row."""
    lowered = pc.utf8_lower(pa.array(keys, pa.large_string()))
    lists = pc.split_pattern_regex(pc.replace_substring_regex(lowered, _APOSTROPHE, ""), _NOT_WORD)
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists)
    nonempty = pc.greater(pc.binary_length(flat), 0)  # the splits at either end of a key
    flat, parents = flat.filter(nonempty), parents.filter(nonempty).to_numpy()
    lengths = np.bincount(parents, minlength=len(keys)).astype(np.int64)
    if not len(flat):
        return np.zeros(0, dtype=np.uint64), lengths
    offsets = np.frombuffer(flat.buffers()[1], dtype=np.int64)[
        flat.offset : flat.offset + len(flat) + 1
    ]
    data = np.frombuffer(flat.buffers()[2], dtype=np.uint8)
    sizes = np.diff(offsets)
    first = np.cumsum(sizes) - sizes  # where each word starts among all words' bytes
    place = np.arange(int(sizes.sum())) - np.repeat(first, sizes)  # a byte's place in its word
    data = data[np.repeat(offsets[:-1], sizes) + place].astype(np.uint64)
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64, as intended
        powers = np.cumprod(np.full(int(sizes.max()), _WORD_BASE, dtype=np.uint64))
        hashes = np.add.reduceat((data + np.uint64(1)) * powers[place], first)
        return _mix64(hashes), lengths


def _mix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: every input bit reaches every output bit."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xFF51AFD7ED558CCD)
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xC4CEB9FE1A85EC53)
        return h ^ (h >> np.uint64(33))


def signatures(keys: list[str], num_perm: int, shingle_size: int) -> list[bytes]:
    """MinHash of the word shingles of each key, then its `content_fingerprint`, as bytes
    (num_perm + 1 little-endian uint64).

    The MinHash is what datasketch's `update_batch` computes in its SCHEME (pre-mix, then its
    affine permutations modulo 2**32), with `shingle_hashes` of the `words` as hash values, for
    a batch of rows at once: SHA-1 over every shingle's text, one row at a time, was most of
    the cost of signing a row."""
    a, b = _empty(num_perm).permutations
    out: list[bytes] = []
    for at in range(0, len(keys), 256):  # bounds the (shingles x num_perm) matrix
        hashed, lengths = words(keys[at : at + 256])
        hv = _fmix(shingle_hashes(hashed, lengths, shingle_size).astype(np.uint32), 32)
        # (num_perm x shingles): each row's shingles are contiguous, which makes the per-row
        # minimum 6x faster than over the transposed layout
        phv = a.reshape(-1, 1) * hv + b.reshape(-1, 1)
        count = np.maximum(lengths - shingle_size + 1, 1)
        mins = np.minimum.reduceat(phv, np.cumsum(count) - count, axis=1).T.astype("<u8")
        content = content_fingerprint(hashed, lengths).astype("<u8")
        out.extend(row.tobytes() + fp.tobytes() for row, fp in zip(mins, content, strict=True))
    return out


def content_fingerprint(hashed: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """One 64-bit hash per row of its words but the `FILLER`, in order (`words`' output):
    rows that differ only in case, spacing, punctuation and filler have the same one."""
    row = np.repeat(np.arange(len(lengths)), lengths)
    keep = ~np.isin(hashed, _filler_hashes())
    row, hashed = row[keep], hashed[keep]
    counts = np.bincount(row, minlength=len(lengths))
    place = np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)
    out = counts.astype(np.uint64)  # the word count, then each word times its place's power
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64, as intended
        powers = np.cumprod(np.full(max(int(counts.max(initial=0)), 1), _WORD_BASE))
        np.add.at(out, row, hashed * powers[place])
    return _mix64(out)


@functools.lru_cache(maxsize=1)
def _filler_hashes() -> np.ndarray:
    return words([" ".join(FILLER)])[0]


def signature(key: str, num_perm: int, shingle_size: int) -> bytes:
    """`signatures` of one key."""
    return signatures([key], num_perm, shingle_size)[0]


def find_duplicates(
    rows: list[tuple[str, str, bytes | None]],
    near: bool,
    threshold: float,
    num_perm: int,
    exact_dedupe: bool = True,
) -> tuple[set[str], set[str]]:
    """Sources to drop as (exact, near) duplicates; `rows` = (source, id, signature) in
    priority order: the first occurrence is kept, later copies go. A near-duplicate has an
    earlier kept row's content fingerprint and, estimated, `threshold` of its shingles."""
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
    sigs = np.frombuffer(b"".join(sig for _, sig in survivors), dtype="<u8")
    sigs = sigs.reshape(-1, num_perm + 1)
    hvs, content = sigs[:, :num_perm], sigs[:, num_perm]
    # Band for a lower threshold than asked: LSH misses many pairs just above its own threshold,
    # and every candidate is confirmed against `threshold` below anyway.
    keys_of = band_keys(hvs, max(0.3, threshold - 0.2))
    # Each (band, key) that more than one row has becomes a group number; a key no other row
    # has in its band makes no candidate either way (-1). A row without any group has no
    # candidates and is no row's candidate: it is kept without a visit, and only rows with a
    # group go through the sequential loop below (in templated data a part of them).
    groups = np.full(keys_of.shape, -1, dtype=np.int64)
    count = 0
    for j, band in enumerate(keys_of.T):
        _, inverse, sizes = np.unique(band, return_inverse=True, return_counts=True)
        shared = sizes[inverse] > 1
        number = np.cumsum(sizes > 1) - 1  # of each shared key, in key order
        groups[shared, j] = number[inverse[shared]] + count
        count += int((sizes > 1).sum())
    visit = np.flatnonzero((groups >= 0).any(axis=1))
    kept_in: list[list[int]] = [[] for _ in range(count)]  # kept rows of each group so far
    for k, row in zip(visit.tolist(), groups[visit].tolist(), strict=True):
        mine = [g for g in row if g >= 0]
        # Earlier kept rows that share a band with this one: LSH candidates, probable matches
        # only; confirmed with the signatures' own similarity estimate and the same content.
        candidates = [c for c in {c for g in mine for c in kept_in[g]} if content[c] == content[k]]
        if candidates and (hvs[candidates] == hvs[k]).sum(axis=1).max() / num_perm >= threshold:
            near_dups.add(survivors[k][0])
            continue
        for g in mine:
            kept_in[g].append(k)
    return exact, near_dups


@functools.lru_cache(maxsize=8)
def _bands(threshold: float, num_perm: int) -> tuple[int, int]:
    # datasketch integrates false positive and negative rates to choose them: 0.1 s a call
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def band_keys(hvs: np.ndarray, threshold: float) -> np.ndarray:
    """One 64-bit key per (row, LSH band): the bands datasketch's MinHashLSH picks for
    `threshold`, each hashed in one vectorised pass (its own per-row bytes-keyed tables cost
    most of dedupe's time on the driver). Rows that share a band share its key; two bands that
    merely collide only add a candidate, which the caller confirms anyway."""
    b, r = _bands(threshold, hvs.shape[1])
    bands = hvs[:, : b * r].reshape(len(hvs), b, r)
    mix = _odd_multipliers(r, seed=0)
    with np.errstate(over="ignore"):  # multiply-add modulo 2**64, as intended
        return (bands * mix).sum(axis=2, dtype=np.uint64)
