"""Exact and near-duplicate decisions and the deterministic split."""

from __future__ import annotations

from rayft.data import dedupe, split

PERM, SHINGLE, THRESHOLD = 128, 5, 0.85


def _row(source: str, text: str) -> tuple[str, str, bytes]:
    key = dedupe.content_key([f"user {text}"])
    return source, dedupe.content_id(key), dedupe.signature(key, PERM, SHINGLE)


LONG = (
    "My blender from order A123456 arrived with a cracked jug and the lid does not close, "
    "I have tried to use it twice and it leaks all over the counter every single time so "
    "I would like a replacement sent to my home address as soon as possible please"
)


def test_exact_duplicates_keep_the_first_and_ignore_case_and_spacing():
    rows = [
        _row("a:1", LONG),
        _row("b:7", LONG.upper()),
        _row("b:8", "  " + LONG.replace(" ", "  ")),
    ]
    exact, near = dedupe.find_duplicates(rows, True, THRESHOLD, PERM)
    assert exact == {"b:7", "b:8"} and near == set()
    # exact dedupe off: identical copies are still near-duplicates (Jaccard 1)
    assert dedupe.find_duplicates(rows, True, THRESHOLD, PERM, exact_dedupe=False) == (
        set(),
        {"b:7", "b:8"},
    )
    assert dedupe.find_duplicates(rows, False, THRESHOLD, PERM, exact_dedupe=False) == (
        set(),
        set(),
    )


def test_near_duplicates_removed_across_files():
    edited = LONG.replace("as soon as possible please", "as soon as possible thanks")
    rows = [_row("a.jsonl:1", LONG), _row("b.jsonl:3", edited)]
    exact, near = dedupe.find_duplicates(rows, True, THRESHOLD, PERM)
    assert exact == set() and near == {"b.jsonl:3"}
    # near-dedupe off: both stay
    assert dedupe.find_duplicates(rows, False, THRESHOLD, PERM) == (set(), set())


def test_templated_rows_with_different_facts_are_kept():
    template = "Hi, my {p} from order {o} has not arrived in {c} after {d} days. Thanks, {n}"
    facts = [
        ("blender", "A111111", "Lisbon", 3, "Ana"),
        ("kettle", "A222222", "Oslo", 12, "Ben"),
        ("yoga mat", "A333333", "Osaka", 7, "Chloe"),
        ("blender", "A444444", "Lisbon", 9, "Dev"),
    ]
    rows = [
        _row(f"t:{i}", template.format(p=p, o=o, c=c, d=d, n=n))
        for i, (p, o, c, d, n) in enumerate(facts)
    ]
    assert dedupe.find_duplicates(rows, True, THRESHOLD, PERM) == (set(), set())


def test_split_is_deterministic_salted_and_follows_ratios():
    ids = [dedupe.content_id(f"row {i}") for i in range(4000)]
    first = [split.assign(c, 0.1, 0.2, seed=0) for c in ids]
    assert first == [split.assign(c, 0.1, 0.2, seed=0) for c in ids]
    assert first != [split.assign(c, 0.1, 0.2, seed=1) for c in ids]
    shares = {s: first.count(s) / len(ids) for s in ("train", "validation", "test")}
    assert abs(shares["validation"] - 0.1) < 0.02 and abs(shares["test"] - 0.2) < 0.02
    assert {split.assign(c, 0.0, 0.0, seed=0) for c in ids} == {"train"}


def test_near_duplicates_just_above_the_threshold_are_found():
    # Estimated Jaccard ~0.87: LSH banded at 0.85 itself misses such pairs about half the time.
    def convo(text: str) -> tuple[str, bytes]:
        key = dedupe.content_key([f"user {text}", "assistant We will send a replacement."])
        return dedupe.content_id(key), dedupe.signature(key, PERM, SHINGLE)

    a, b = convo(LONG), convo(LONG.replace("please", "thanks"))
    rows = [("a:1", *a), ("a:2", *b)]
    assert dedupe.find_duplicates(rows, True, THRESHOLD, PERM) == (set(), {"a:2"})
