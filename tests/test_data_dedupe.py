"""Exact and near-duplicate decisions and the deterministic split."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa

from rayft.data import dedupe, sources, split, stages

PERM, SHINGLE, THRESHOLD = 128, 5, 0.85


def _row(source: str, text: str) -> tuple[str, str, bytes]:
    parts = [("user", text)]
    key = dedupe.near_key(parts)
    return source, dedupe.content_id(dedupe.exact_key(parts)), dedupe.signature(key, PERM, SHINGLE)


def _signed(rows: list[dict], pii: list[str] = ()) -> list[tuple[str, str, bytes]]:
    """(source, id, signature) of JSONL rows, cleaned (PII `pii` scrubbed) and signed by the
    pipeline's own batch functions."""
    data = "\n".join(json.dumps(r) for r in rows).encode()
    f = sources.InputFile("t.jsonl", "t.jsonl", "file", 0, "")
    raw = sources.split_files(
        pa.table({"bytes": [data], "path": ["t.jsonl"]}), {"t.jsonl": f}, "auto"
    )
    out = stages.validate_clean(raw, True, list(pii), PERM, SHINGLE, True).to_pylist()
    assert all(r["error_kind"] is None for r in out)
    return [(f"t:{r['line']}", r["id"], r["minhash"]) for r in out]


LONG = (
    "My blender from order A123456 arrived with a cracked jug and the lid does not close, "
    "I have tried to use it twice and it leaks all over the counter every single time so "
    "I would like a replacement sent to my home address as soon as possible please"
)
# A copy with "Our" for "My": filler (`dedupe.FILLER`), Jaccard 0.957 of 5-word shingles.
NEAR = LONG.replace("My blender", "Our blender")
# "please" dropped at the end: Jaccard 0.839 with the answer below (estimated 0.836), just
# above 0.8.
NEAR_08 = LONG.removesuffix(" please")


def test_exact_duplicates_keep_the_first_and_ignore_spacing_only():
    rows = [
        _row("a:1", LONG),
        _row("b:7", LONG.upper()),
        _row("b:8", "  " + LONG.replace(" ", "  ").replace(",", ",\n")),
    ]
    exact, near = dedupe.find_duplicates(rows, True, THRESHOLD, PERM)
    # another case is other content for the exact key, and the same words for near-dedupe
    assert exact == {"b:8"} and near == {"b:7"}
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
    rows = [_row("a.jsonl:1", LONG), _row("b.jsonl:3", NEAR)]
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
    # LSH banded at 0.8 itself (9 bands of 13) makes a pair of Jaccard 0.839 a candidate
    # about three times in five (1 - (1 - 0.839**13)**9 = 0.62); banded at 0.6, nearly always.
    def convo(text: str) -> tuple[str, bytes]:
        parts = [("user", text), ("assistant", "We will send a replacement.")]
        key = dedupe.near_key(parts)
        return dedupe.content_id(dedupe.exact_key(parts)), dedupe.signature(key, PERM, SHINGLE)

    a, b = convo(LONG), convo(NEAR_08)
    rows = [("a:1", *a), ("a:2", *b)]
    assert dedupe.find_duplicates(rows, True, 0.8, PERM) == (set(), {"a:2"})
    assert dedupe.find_duplicates(rows, True, 0.85, PERM) == (set(), set())


SYSTEM = " ".join(
    f"Rule {i}: be polite, precise and brief, and answer as Acme's support team would."
    for i in range(30)
)  # 420 words shared by every row, as in datasets generated from one template


def _support(user: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
    }


def test_a_shared_system_prompt_does_not_make_rows_near_duplicates():
    assert len(SYSTEM.split()) >= 400
    facts = [("A111111", "Ana", 3), ("A222222", "Ben", 12), ("A333333", "Chloe", 7)]
    facts.append(("A444444", "Dev", 9))
    rows = [
        _support(
            f"Hi, my order {o} has not arrived after {d} days. Thanks, {n}",
            f"Sorry {n}, order {o} is late; it ships within {d} days.",
        )
        for o, n, d in facts
    ]
    # a truly near-identical pair still goes: the second copy of the last ticket
    rows.append(_support(LONG, "We will send a replacement."))
    rows.append(_support(NEAR, "We will send a replacement."))
    assert dedupe.find_duplicates(_signed(rows), True, THRESHOLD, PERM) == (set(), {"t:6"})


def test_exact_key_keeps_case_and_punctuation_but_not_spacing():
    answers = ['{"category": "billing"}', "Category: billing", "category billing"]
    rows = [_support("Charged twice for A554710.", a) for a in answers]
    rows.append(_support("Charged  twice for\nA554710.", answers[0]))  # only spacing differs
    rows.append({"messages": rows[0]["messages"][1:]})  # no system prompt: other content
    exact, near = dedupe.find_duplicates(_signed(rows), False, THRESHOLD, PERM)
    assert (exact, near) == ({"t:4"}, set())


def test_band_keys_are_equal_exactly_where_a_band_is():
    """LSH candidates come from these keys: a band two signatures share must give one key
    (else a near duplicate is never a candidate), a band they do not share another key."""
    import numpy as np
    from datasketch import MinHashLSH

    rng = np.random.default_rng(1)
    hvs = rng.integers(0, 2**32, size=(3, PERM), dtype=np.uint64)
    lsh = MinHashLSH(threshold=THRESHOLD - 0.2, num_perm=PERM)
    hvs[1, : lsh.r] = hvs[0, : lsh.r]  # row 1 shares row 0's first band only
    hvs[2, lsh.r : 2 * lsh.r] = hvs[0, lsh.r : 2 * lsh.r]  # row 2 its second band only
    hvs[2, 0] = hvs[0, 0]  # and one value of the first band: not the band
    keys = dedupe.band_keys(hvs, THRESHOLD - 0.2)
    assert keys.shape == (3, lsh.b)  # datasketch's banding for that threshold
    assert (keys[1] == keys[0]).tolist() == [True] + [False] * (lsh.b - 1)
    assert (keys[2] == keys[0]).tolist() == [False, True] + [False] * (lsh.b - 2)


def _true_jaccard(a: str, b: str) -> float:
    def grams(key: str) -> set[tuple[str, ...]]:
        w = key.split()
        return {tuple(w[i : i + SHINGLE]) for i in range(max(len(w) - SHINGLE + 1, 1))}

    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y)


def test_signatures_estimate_the_jaccard_similarity_of_shingles():
    # Pairs from 0 to 1 similar: a text and a copy with some of its words replaced.
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(300)]
    errors = []
    for _ in range(60):
        words = [rng.choice(vocab) for _ in range(rng.randint(20, 120))]
        edited = [w if rng.random() > rng.choice([0.02, 0.05, 0.1, 0.3]) else "x" for w in words]
        a, b = " ".join(words), " ".join(edited)
        sa, sb = (np.frombuffer(dedupe.signature(k, PERM, SHINGLE), "<u8")[:PERM] for k in (a, b))
        errors.append(abs((sa == sb).mean() - _true_jaccard(a, b)))
    # the standard error of 128 permutations is at most 0.044
    assert np.mean(errors) < 0.04 and max(errors) < 0.15


def test_a_batch_signs_each_row_as_alone():
    keys = ["", "a b", "one two three four five", LONG, NEAR, "x\x1fy z " * 40]
    assert dedupe.signatures(keys * 2, PERM, SHINGLE) == [
        dedupe.signature(k, PERM, SHINGLE) for k in keys * 2
    ]


def test_words_are_lower_cased_runs_of_letters_digits_and_underscores():
    hashed, lengths = dedupe.words(
        ["Straße, CAFÉ_2 x²!", "", " ...", "straße café_2 x 2", "a\x1fb"]
    )
    assert lengths.tolist() == [3, 0, 0, 4, 2]
    first, second = hashed[:3], hashed[3:7]
    assert first[:2].tolist() == second[:2].tolist()  # case does not matter
    assert first[2] not in second[2:]  # "x²" is one word, neither "x" nor "2"
    # different words, different hashes; a word hashes alike wherever it stands
    vocab = [f"{a}{b}{c}" for a in "abcdefghij" for b in "klmnopqrstuvwxyz" for c in range(300)]
    many, _ = dedupe.words([" ".join(vocab), " ".join(reversed(vocab))])
    assert len(set(many[: len(vocab)].tolist())) == len(vocab)
    assert many[: len(vocab)].tolist() == many[len(vocab) :][::-1].tolist()


def test_labelled_pairs_meet_the_precision_and_recall_goal():
    """Issue 20: near-dedupe removed rows that differ in one fact. On the labelled set
    (tests/dedupe_pairs.py; benchmarks/bench_dedupe.py prints the numbers), dedupe as prepare
    runs it must have precision >= 0.98 at recall >= 0.9, and remove none of the rows that
    differ in a fact."""
    import dedupe_pairs

    labelled = dedupe_pairs.pairs(seed=0, per_category=40)
    got = dedupe_pairs.scores(labelled, dedupe_pairs.removed(labelled))
    assert got["precision"] >= 0.98 and got["recall"] >= 0.9, got
    assert all(got["removed"][c].startswith("0/") for c in got["removed"] if c.startswith("not"))


def test_rows_that_differ_in_one_fact_are_kept_even_at_high_similarity():
    # Issue 20's report: Jaccard above 0.9, one product word apart. Numbers, names and
    # negations are facts too; rows keep their answer.
    answer = (
        "We are sorry about the damage. A replacement ships today from our warehouse, and you "
        "will get a prepaid label by email to send the damaged one back within thirty days; the "
        "refund of the shipping costs follows within five business days of its arrival."
    )
    base = LONG.replace("order A123456", "order 1234")
    for other in [
        base.replace("blender", "kettle"),
        base.replace("order 1234", "order 5678"),
        base.replace("does not close", "does close"),
        base.replace("My blender", "Ana's blender"),
    ]:
        rows = [_support(base, answer), _support(other, answer)]
        signed = _signed(rows)
        a, b = (np.frombuffer(s, "<u8")[:PERM] for _, _, s in signed)
        assert (a == b).mean() >= THRESHOLD, other  # a duplicate by similarity alone
        assert dedupe.find_duplicates(signed, True, THRESHOLD, PERM) == (set(), set())


def test_content_fingerprint_ignores_case_spacing_punctuation_and_filler_only():
    def fp(text: str) -> int:
        return int(dedupe.content_fingerprint(*dedupe.words([text]))[0])

    base = fp("Refund order 1234 for the blender, it doesn't work.")
    assert base == fp("REFUND  ORDER 1234 FOR THE BLENDER - IT DOESNT WORK!!")
    assert base == fp("Hi, please refund order 1234 for my blender, it doesn\u2019t work. Thanks")
    for other in [
        "Refund order 1235 for the blender, it doesn't work.",
        "Refund order 1234 for the kettle, it doesn't work.",
        "Refund order 1234 for the blender, it does work.",
        "Cancel order 1234 for the blender, it doesn't work.",
        "Refund the blender for order 1234, it doesn't work.",  # same words, other order
        "Refund order 1234 for the blender, it doesn't work, Ana.",
    ]:
        assert fp(other) != base, other
    assert fp("") == fp("hi, thanks!")  # nothing but filler: as empty


def test_a_retyped_copy_with_a_phone_number_is_a_near_duplicate_once_scrubbed():
    # Issue 20: upper case and runs of spaces in the number kept its digits, and its row
    # escaped near-dedupe against the original.
    answer = "We will call you back within the hour about the replacement."
    rows = [
        _support(LONG + " Call me on +90 532 338 84 33.", answer),
        _support(LONG.upper() + " CALL ME ON +90  532  338  84  33.", answer),
    ]
    signed = _signed(rows, pii=["phone"])
    assert dedupe.find_duplicates(signed, True, THRESHOLD, PERM) == (set(), {"t:2"})
