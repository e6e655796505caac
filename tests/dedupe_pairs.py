"""A labelled set of support-chat row pairs for near-duplicate detection (deterministic per seed).

Duplicates: a row and a copy of it that differs only in whitespace, punctuation, casing,
a greeting or politeness word, or in how a phone number is typed (scrubbed to <PHONE> in both).
Not duplicates: rows from one template that differ in a number, a name, a product, a negation,
an intent or the answer's category, and paraphrases (other words, same request). Rows are long
and short: a one-word change leaves long rows at a Jaccard similarity of 0.9 and more.

Used by tests/test_data_dedupe.py (the goal) and benchmarks/bench_dedupe.py (the numbers).
"""

from __future__ import annotations

import random
from collections.abc import Callable

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Elif", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kofi"]
PRODUCTS = [
    "blender",
    "kettle",
    "desk lamp",
    "air fryer",
    "yoga mat",
    "rain jacket",
    "coffee grinder",
    "monitor stand",
    "headphones",
    "toaster",
]
CITIES = ["Lisbon", "Oslo", "Denver", "Osaka", "Leeds", "Lyon", "Austin", "Porto", "Graz"]
CATEGORIES = ["billing", "shipping", "account", "technical", "returns"]

# (user, assistant) with slots; {neg} holds the template's (affirmative, negated) phrase and
# {verb} one of its intents.
LONG = [
    (
        "Hi, I am {name} and I ordered a {product} on the {day}th with order number {order}. "
        "It arrived yesterday in {city} but the box was damaged and the {product} {neg}. I "
        "have already tried the steps in the manual, but nothing helped. Could you please "
        "tell me how to {verb} order {order}?",
        "Hello {name}, I am sorry to hear about the {product} from order {order}. I have "
        "opened a case for order {order}; you will receive a prepaid shipping label by email "
        "within {days} business days. Once the {product} reaches our warehouse we will "
        "handle the rest and refund ${amount} to your original payment method.",
        ("turns on", "does not turn on"),
        ["return", "exchange", "cancel", "replace"],
    ),
    (
        "Hello, my name is {name}. I was charged ${amount} twice for order {order} and my "
        "bank statement from the {day}th shows both payments. The {product} itself {neg}, "
        "so I only want to {verb} the second charge. I live in {city} and I have been a "
        "customer for {days} years, so I hope this can be sorted out quickly.",
        "Thank you {name}. I can see the two charges of ${amount} for order {order}. I have "
        "asked our billing team to review the second payment, and they usually answer "
        "within {days} days. You do not need to send the {product} back.",
        ("works fine", "does not work"),
        ["refund", "dispute", "reverse", "cancel"],
    ),
    (
        "Dear Acme team, I want to {verb} the {product} from order {order}. I bought it "
        "{days} days ago as a gift for a friend in {city}, and she says it {neg}. The "
        "receipt is in my account under the name {name}. What is the fastest way to do this, "
        "and will I get the full ${amount} back?",
        '{{"category": "{category}", "priority": "medium", "reply": "We have emailed {name} a '
        "return label for the {product}; the ${amount} refund follows once it arrives "
        'within {days} days."}}',
        ("is what she wanted", "is not what she wanted"),
        ["return", "exchange", "swap", "send back"],
    ),
]
SHORT = [
    (
        "My {product} from order {order} {neg}. Can I {verb} it?",
        "Sorry {name}, we will look at order {order} today.",
        ("works", "does not work"),
        ["return", "exchange", "repair", "replace"],
    ),
    (
        "Order {order} for ${amount} {neg} in {city}. Please {verb} it.",
        '{{"category": "{category}", "priority": "high"}}',
        ("has arrived", "has not arrived"),
        ["track", "cancel", "refund", "resend"],
    ),
]

# Paraphrases of LONG[0] and SHORT[0]: the same facts in other words.
PARAPHRASES = {
    0: (
        "Hello, this is {name}. On the {day}th I bought a {product} (order {order}). It was "
        "delivered to {city} yesterday, the packaging was crushed and the {product} {neg}. "
        "Following the manual did not fix anything. How can I {verb} order {order}?",
        "Hi {name}, sorry about your {product}. A case is open for order {order} and a "
        "prepaid label will reach your inbox in {days} business days. When the {product} is "
        "back with us we take care of everything and return ${amount} to your card.",
    ),
    len(LONG): (
        "Can I {verb} my {product}? It {neg} and it came with order {order}.",
        "Hi {name}, sorry about that: order {order} is with our team today.",
    ),
}

TEMPLATES = LONG + SHORT


def _facts(rng: random.Random) -> dict:
    return {
        "name": rng.choice(NAMES),
        "product": rng.choice(PRODUCTS),
        "order": f"A{rng.randint(100000, 999999)}",
        "city": rng.choice(CITIES),
        "day": rng.randint(4, 28),
        "days": rng.randint(2, 14),
        "amount": rng.choice([19, 35, 49, 79, 129, 249]),
        "category": rng.choice(CATEGORIES),
        "negated": False,
        "verb": 0,
    }


def render(t: int, facts: dict, paraphrase: bool = False) -> list[dict]:
    user, answer, neg, verbs = TEMPLATES[t]
    if paraphrase:
        user, answer = PARAPHRASES[t]
    slots = {**facts, "neg": neg[facts["negated"]], "verb": verbs[facts["verb"]]}
    return [
        {"role": "user", "content": user.format(**slots)},
        {"role": "assistant", "content": answer.format(**slots)},
    ]


def _other(rng: random.Random, values: list, current):
    return rng.choice([v for v in values if v != current])


# --------------------------------------------------------------------------- edits of a copy


def _spaces(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    seps = [rng.choice([" ", " ", "  ", "   ", "\t", "\n", " \n"]) for _ in words[1:]]
    return words[0] + "".join(s + w for s, w in zip(seps, words[1:], strict=True)) + " "


def _punctuation(rng: random.Random, text: str) -> str:
    edits = [
        lambda s: s.replace(",", ""),
        lambda s: s.replace(". ", "! ", 1),
        lambda s: s.replace("?", "??"),
        lambda s: s.replace("'", "\u2019"),
        lambda s: s.replace(", ", " - "),
        lambda s: s.rstrip(".?!") + "...",
        lambda s: s.replace("(", "").replace(")", ""),
        lambda s: s.replace(". ", "; ", 1),
        lambda s: s.replace("I am", "I'm").replace("I'm", "Im"),  # a dropped apostrophe
    ]
    for edit in rng.sample(edits, 3):
        text = edit(text)
    return text


def _casing(rng: random.Random, text: str) -> str:
    return rng.choice([str.upper, str.lower, str.title, str.swapcase])(text)


def _filler(rng: random.Random, text: str) -> str:
    return rng.choice(
        [
            lambda s: "Hi, " + s,
            lambda s: "Hello! " + s,
            lambda s: s + " Thanks!",
            lambda s: s + " Thank you so much.",
            lambda s: s.replace("Could you", "Could you please").replace("Can I", "Please, can I"),
        ]
    )(text)


def _phone_retyped(rng: random.Random, text: str) -> tuple[str, str]:
    """(original, copy) with a phone number: the copy upper-cased with runs of spaces."""
    groups = ["90", "532", "338", "84", "33"]
    original = text + f" You can call me on +{' '.join(groups)}."
    sep = rng.choice(["  ", "\t", "\u00a0", " - ", "   "])
    return original, (text + f" you can call me on +{sep.join(groups)}.").upper()


def _combined(rng: random.Random, text: str) -> str:
    return _spaces(rng, _casing(rng, _punctuation(rng, text)))


COPY_EDITS: dict[str, Callable[[random.Random, str], str]] = {
    "copy: whitespace": _spaces,
    "copy: punctuation": _punctuation,
    "copy: casing": _casing,
    "copy: greeting/politeness": _filler,
    "copy: all three edits": _combined,
}


def _edit_user(rows: list[dict], edit: Callable[[str], str]) -> list[dict]:
    return [{**rows[0], "content": edit(rows[0]["content"])}, rows[1]]


def _changed(rng: random.Random, t: int, facts: dict, what: str) -> dict:
    out = dict(facts)
    if what == "number":
        key = rng.choice(["order", "amount", "days", "day"])
        if key == "order":
            out[key] = f"A{rng.randint(100000, 999999)}"
        else:
            out[key] = facts[key] + rng.choice([1, 2, 3, 10])
    elif what == "name":
        out["name"] = _other(rng, NAMES, facts["name"])
    elif what == "product":
        out["product"] = _other(rng, PRODUCTS, facts["product"])
    elif what == "negation":
        out["negated"] = not facts["negated"]
    elif what == "intent":
        out["verb"] = _other(rng, list(range(len(TEMPLATES[t][3]))), facts["verb"])
    elif what == "answer category":
        out["category"] = _other(rng, CATEGORIES, facts["category"])
    return out


def pairs(seed: int = 0, per_category: int = 60) -> list[tuple[list[dict], list[dict], bool, str]]:
    """(row, later row, is a duplicate, category): `per_category` pairs in each category."""
    rng = random.Random(seed)
    out = []
    for category, edit in COPY_EDITS.items():
        for _ in range(per_category):
            t, facts = rng.randrange(len(TEMPLATES)), _facts(rng)
            row = render(t, facts)
            out.append((row, _edit_user(row, lambda s, e=edit: e(rng, s)), True, category))
    for _ in range(per_category):
        t, facts = rng.randrange(len(TEMPLATES)), _facts(rng)
        first, copy = _phone_retyped(rng, render(t, facts)[0]["content"])
        row = render(t, facts)
        out.append(
            (
                [{**row[0], "content": first}, row[1]],
                [{**row[0], "content": copy}, row[1]],
                True,
                "copy: phone retyped",
            )
        )
    differences = ["number", "name", "product", "negation", "intent"]
    for what in differences:
        for _ in range(per_category):
            row = changed = []
            while changed == row:  # a template without that slot: another draw
                t, facts = rng.randrange(len(TEMPLATES)), _facts(rng)
                row, changed = render(t, facts), render(t, _changed(rng, t, facts, what))
            out.append((row, changed, False, f"not: {what}"))
    for _ in range(per_category):  # same question, other answer (templates whose answer has it)
        t, facts = rng.choice([2, 4]), _facts(rng)
        changed = _changed(rng, t, facts, "answer category")
        out.append((render(t, facts), render(t, changed), False, "not: answer category"))
    for _ in range(per_category):
        t, facts = rng.choice(list(PARAPHRASES)), _facts(rng)
        out.append((render(t, facts), render(t, facts, True), False, "not: paraphrase"))
    return out


def _typo(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    i = rng.choice([i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()])
    j = rng.randrange(len(words[i]) - 1)
    w = words[i]
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def harder_copies(seed: int = 1, per_category: int = 60) -> list:
    """Near-copies outside the goal's set, reported beside it: a misspelt word, a signature
    line added. The rule keeps both rows of such pairs (a changed word is a changed word)."""
    rng = random.Random(seed)
    edits = {
        "copy: one typo": _typo,
        "copy: signature line": lambda r, s: s + "\n\nSent from my phone",
    }
    out = []
    for category, edit in edits.items():
        for _ in range(per_category):
            t, facts = rng.randrange(len(TEMPLATES)), _facts(rng)
            row = render(t, facts)
            out.append((row, _edit_user(row, lambda s, e=edit: e(rng, s)), True, category))
    return out


def removed(
    labelled: list[tuple[list[dict], list[dict], bool, str]],
    threshold: float = 0.85,
    num_perm: int = 128,
    shingle_size: int = 5,
    content_check: bool = True,
) -> list[bool]:
    """Whether `rayft prepare`'s dedupe (exact and near, the default settings) drops the later
    row of each pair: rows cleaned (normalised, PII scrubbed) and signed by the pipeline's own
    batch function, each pair decided on its own. `content_check=False` blanks the content
    fingerprints: the rule before issue 20, similarity alone."""
    import json

    import pyarrow as pa

    from rayft.data import clean, dedupe, sources, stages

    rows = [r for a, b, _, _ in labelled for r in (a, b)]
    data = "\n".join(json.dumps({"messages": r}) for r in rows).encode()
    f = sources.InputFile("t.jsonl", "t.jsonl", "file", 0, "")
    raw = sources.split_files(
        pa.table({"bytes": [data], "path": ["t.jsonl"]}), {"t.jsonl": f}, "chat"
    )
    types = list(clean.PLACEHOLDERS)
    out = stages.validate_clean(raw, True, types, num_perm, shingle_size, True).to_pylist()
    assert all(r["error_kind"] is None for r in out), [r["reason"] for r in out][:3]
    blank = b"" if content_check else bytes(8)
    signed = [
        (f"t:{r['line']}", r["id"], r["minhash"] if content_check else r["minhash"][:-8] + blank)
        for r in out
    ]
    decisions = []
    for i in range(0, len(signed), 2):
        exact, near = dedupe.find_duplicates(signed[i : i + 2], True, threshold, num_perm)
        decisions.append(bool(exact or near))
    return decisions


def scores(labelled: list, decisions: list[bool]) -> dict:
    """Precision and recall of the removals, and per category the share removed."""
    tp = sum(d and lab for (_, _, lab, _), d in zip(labelled, decisions, strict=True))
    fp = sum(d and not lab for (_, _, lab, _), d in zip(labelled, decisions, strict=True))
    positives = sum(lab for _, _, lab, _ in labelled)
    by: dict[str, list[int]] = {}
    for (_, _, _, category), d in zip(labelled, decisions, strict=True):
        by.setdefault(category, [0, 0])
        by[category][0] += d
        by[category][1] += 1
    return {
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / positives,
        "removed": {c: f"{k}/{n}" for c, (k, n) in by.items()},
    }
