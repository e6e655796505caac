"""Sequence packing: bin packing of tokenized examples into sequences of at most max_seq_len.

Packed rows are unpadded; `position_ids` restart at 0 for each example so attention that
honours them keeps the examples independent. Efficiency is defined as real tokens divided by
the capacity of the emitted sequences (rows x max_seq_len): the padding a fixed-shape batch
would need is the waste.
"""

from __future__ import annotations

from typing import Any


def plan(lengths: list[int], max_len: int) -> list[list[int]]:
    """Indices per bin, by minimum bin slack: each bin takes the longest example left, then the
    subset of the rest that fills it best (an exact subset-sum over token counts).

    Best-fit decreasing was tried first: with chat examples of a fifth of a bin it leaves a
    6-8 % gap in most bins (0.92-0.93 efficiency on the demo data), because it never mixes long
    and short examples on purpose. The subset-sum is a bitset over 0..max_len, so a bin costs
    one big-integer shift per candidate example.
    """
    by_len: dict[int, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lambda i: -i):  # pop() then yields input order
        n = lengths[i]
        if n > max_len:
            raise ValueError(f"example of {n} tokens does not fit max_seq_len={max_len}")
        by_len.setdefault(n, []).append(i)
    bins: list[list[int]] = []
    while by_len:
        first = max(by_len)
        members = [_take(by_len, first)]
        room = max_len - first
        reach, history, full = 1, [], 1 << room
        for n in sorted((n for n in by_len if n <= room), reverse=True):
            for _ in range(min(len(by_len[n]), room // n)):
                history.append((n, reach))
                reach = (reach | (reach << n)) & ((full << 1) - 1)
            if reach & full:
                break  # an exact fill: no need to look further
        target = reach.bit_length() - 1
        for n, before in reversed(history):  # walk back: an item is used iff target needs it
            if target and not (before >> target) & 1:
                members.append(_take(by_len, n))
                target -= n
        bins.append(members)
    return bins


def _take(by_len: dict[int, list[int]], n: int) -> int:
    i = by_len[n].pop()
    if not by_len[n]:
        del by_len[n]
    return i


def pack(
    input_ids: list[list[int]], labels: list[list[int]], max_len: int
) -> list[dict[str, list[int]]]:
    """Packed rows (input_ids, labels, position_ids, seq_lengths)."""
    packs = []
    for members in plan([len(x) for x in input_ids], max_len):
        row: dict[str, Any] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
        for i in members:
            row["input_ids"] += input_ids[i]
            row["labels"] += labels[i]
            row["position_ids"] += range(len(input_ids[i]))
            row["seq_lengths"].append(len(input_ids[i]))
        packs.append(row)
    return packs


def efficiency(real_tokens: int, num_sequences: int, max_len: int) -> float:
    return real_tokens / (num_sequences * max_len) if num_sequences else 0.0
