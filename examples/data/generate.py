"""Generate the Acme support-triage demo dataset (deterministic: same seed, same bytes).

    python examples/data/generate.py            # writes support.jsonl and support_bad.jsonl

Each row is an OpenAI chat conversation: a fixed system message, a customer message built from
varied templates and facts, and an assistant answer that is exactly one JSON object on one line:
{"category": billing|shipping|account|technical|returns, "priority": low|medium|high,
"reply": one short sentence}. Category and priority follow from the content (what the customer
writes about, how long they waited, how much money is at stake), so they are learnable. The
system message does not describe the format: a base model does not produce it unprompted, so
fine-tuning makes a measurable difference.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = "You are Acme's support triage assistant."
NAMES = [
    "Ana",
    "Ben",
    "Chloe",
    "Dev",
    "Elif",
    "Farah",
    "Goran",
    "Hana",
    "Ivo",
    "Jun",
    "Kofi",
    "Lena",
    "Mateo",
    "Nia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tariq",
    "Uma",
    "Wen",
]
PRODUCTS = [
    "blender",
    "desk lamp",
    "hiking backpack",
    "wireless mouse",
    "coffee grinder",
    "yoga mat",
    "rain jacket",
    "phone case",
    "air fryer",
    "bookshelf",
    "kettle",
    "running shoes",
    "monitor stand",
    "water bottle",
    "camping tent",
    "headphones",
]
CITIES = ["Lisbon", "Oslo", "Denver", "Osaka", "Leeds", "Lyon", "Austin", "Porto", "Graz"]
DEVICES = ["iPhone", "Android phone", "Windows laptop", "Mac", "Chromebook", "iPad"]
GREETINGS = ["Hi,", "Hello,", "Hey there,", "Good morning,", "Hi Acme team,", ""]
SIGNOFFS = ["Thanks", "Thank you", "Cheers", "Regards", ""]


def _order(rng: random.Random) -> str:
    return f"A{rng.randint(100000, 999999)}"


def _money(rng: random.Random) -> int:
    return rng.choice([12, 19, 24, 35, 49, 58, 79, 99, 129, 189, 249, 420, 650])


def _billing(rng):
    order, amount = _order(rng), _money(rng)
    kind = rng.choice(["double", "wrong", "invoice", "card"])
    if kind == "double":
        text = f"I was charged twice for order {order}, ${amount} each time. Please fix this."
        prio = "high" if amount >= 100 else "medium"
        reply = (
            f"Sorry about the double charge on order {order}; we will refund the extra ${amount}."
        )
    elif kind == "wrong":
        paid = amount + rng.choice([5, 10, 20])
        text = (
            f"My order {order} should have cost ${amount} but I paid ${paid}. Why the difference?"
        )
        prio = "medium"
        reply = f"We will check the price of order {order} and refund any overcharge."
    elif kind == "invoice":
        text = f"Can you send me an invoice for order {order}? I need it for my company expenses."
        prio = "low"
        reply = f"We will email the invoice for order {order} today."
    else:
        text = f"My card was declined when paying for the {rng.choice(PRODUCTS)}, but my bank says it is fine."
        prio = "medium"
        reply = "Please try again in an hour; we will check the payment block on our side."
    return "billing", prio, text, reply


def _shipping(rng):
    order, days, city = _order(rng), rng.randint(1, 21), rng.choice(CITIES)
    product = rng.choice(PRODUCTS)
    kind = rng.choice(["late", "where", "address"])
    prio = "high" if days > 10 else "medium" if days > 4 else "low"
    if kind == "late":
        text = f"My {product} (order {order}) was due {days} days ago and still has not arrived in {city}."
        reply = f"We are tracing order {order} with the courier and will update you within a day."
    elif kind == "where":
        text = f"Where is my package? Order {order} shows no tracking update for {days} days."
        reply = f"We have asked the courier for the status of order {order}."
    else:
        prio = "medium"
        text = f"I need to change the delivery address of order {order} to my new flat in {city}."
        reply = f"We will try to redirect order {order} to your address in {city}."
    return "shipping", prio, text, reply


def _account(rng):
    kind = rng.choice(["password", "locked", "email", "delete"])
    if kind == "password":
        text = f"I forgot my password and the reset link from {rng.randint(2, 6)} tries never came."
        prio = "medium"
        reply = "We have sent a fresh reset link; please check your spam folder too."
    elif kind == "locked":
        hours = rng.randint(1, 48)
        text = f"My account has been locked for {hours} hours after too many login attempts."
        prio = "high" if hours > 24 else "medium"
        reply = "We have unlocked your account; please sign in again."
    elif kind == "email":
        text = "How do I change the email address on my Acme account?"
        text = rng.choice(
            [text, "I want to update the email on my profile, where is that setting?"]
        )
        prio = "low"
        reply = "Go to Settings, then Profile, and edit the email field."
    else:
        text = f"Please delete my account and all my data. I no longer shop at Acme since {rng.randint(2019, 2025)}."
        prio = "medium"
        reply = "We have started the deletion of your account and will confirm by email."
    return "account", prio, text, reply


def _technical(rng):
    device, kind = rng.choice(DEVICES), rng.choice(["crash", "checkout", "slow", "login"])
    version = f"{rng.randint(3, 5)}.{rng.randint(0, 9)}.{rng.randint(0, 20)}"
    if kind == "crash":
        text = f"The Acme app {version} crashes on my {device} every time I open the cart."
        prio = "high"
        reply = f"We have logged the crash of app {version} on {device} for our engineers."
    elif kind == "checkout":
        text = (
            f"The checkout button does nothing on my {device}; I tried {rng.randint(2, 9)} times."
        )
        prio = "high"
        reply = "Please try the website checkout while we fix the button."
    elif kind == "slow":
        text = f"Product pages take about {rng.randint(5, 40)} seconds to load on my {device}."
        prio = "low"
        reply = "We are looking into the slow pages; clearing the app cache may help meanwhile."
    else:
        text = f"I get error code E{rng.randint(100, 999)} when I log in on my {device}."
        prio = "medium"
        reply = "Please update the app; that error code is fixed in the latest version."
    return "technical", prio, text, reply


def _returns(rng):
    order, product, days = _order(rng), rng.choice(PRODUCTS), rng.randint(1, 60)
    kind = rng.choice(["return", "broken", "refund"])
    if kind == "return":
        text = f"I want to return the {product} from order {order}; I bought it {days} days ago."
        prio = "low" if days <= 30 else "medium"
        reply = f"We have emailed you a return label for the {product}."
    elif kind == "broken":
        text = f"The {product} from order {order} arrived broken. I want a replacement or refund."
        prio = "high"
        reply = f"Sorry the {product} arrived broken; we will ship a replacement right away."
    else:
        text = f"I returned the {product} {days} days ago but have not received my refund for order {order}."
        prio = "high" if days > 14 else "medium"
        reply = f"We will check the refund for order {order} and confirm within two days."
    return "returns", prio, text, reply


TOPICS = [_billing, _shipping, _account, _technical, _returns]


def example(rng: random.Random) -> dict:
    category, priority, text, reply = rng.choice(TOPICS)(rng)
    greet, name, sign = rng.choice(GREETINGS), rng.choice(NAMES), rng.choice(SIGNOFFS)
    user = " ".join(p for p in (greet, text, f"{sign}, {name}" if sign else name) if p)
    answer = json.dumps({"category": category, "priority": priority, "reply": reply})
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
    }


def generate(n: int, seed: int) -> list[dict]:
    rng, rows, seen = random.Random(seed), [], set()
    while len(rows) < n:
        row = example(rng)
        key = row["messages"][1]["content"]
        if key not in seen:  # the demo has no exact repeats; dedupe is shown by the tests
            seen.add(key)
            rows.append(row)
    return rows


BAD_ROWS = [
    '{"messages": [{"role": "user", "content": "Where is my order A123456?"}',  # bad JSON
    '["not", "an", "object"]',
    '{"conversation": []}',  # no known keys
    '{"messages": [{"role": "user", "content": "Refund please"}]}',  # no assistant turn
    '{"messages": [{"role": "customer", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}',
    '{"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "{}"}]}',
    '{"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "{}"}]}',
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()
    out = Path(args.out)
    rows = generate(args.rows, args.seed)
    with open(out / "support.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    # The bad-row demo: good rows with broken ones in between (use with data.on_error).
    mixed = [json.dumps(r) for r in rows[:20]]
    for i, bad in enumerate(BAD_ROWS):
        mixed.insert(2 + 3 * i, bad)
    (out / "support_bad.jsonl").write_text("\n".join(mixed) + "\n")
    print(
        f"wrote {len(rows)} rows to {out / 'support.jsonl'} and {len(mixed)} to support_bad.jsonl"
    )


if __name__ == "__main__":
    main()
