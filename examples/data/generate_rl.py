"""Derive the reinforcement and preference demo sets from support.jsonl (deterministic).

    python examples/data/generate_rl.py     # writes support_rft.jsonl and support_pairs.jsonl

- support_rft.jsonl: OpenAI's reinforcement fine-tuning rows. The prompt asks for the
  message's category in one word; `reference_answer` (the category) and `triage` (the full
  triage JSON) are the fields a grader reads as {{item.reference_answer}} and {{item.triage}}.
  configs/grpo-demo.yaml trains on it with a text_similarity grader: the base model answers
  with chatty sentences, and the reward rises as the policy learns to answer with the category.
- support_pairs.jsonl: preference rows for a reward model (configs/reward-demo.yaml): the
  chosen answer is the right triage, the rejected one the same answer with another category —
  a reward model must read the customer's message to tell them apart.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
CATEGORIES = ["billing", "shipping", "account", "technical", "returns"]
ASK = (
    "Which category is this support message: billing, shipping, account, technical or returns? "
    "Answer with the category only."
)


def main() -> None:
    rows = [json.loads(line) for line in (HERE / "support.jsonl").read_text().splitlines()]
    rft, pairs = [], []
    for i, row in enumerate(rows):
        prompt = [m for m in row["messages"] if m["role"] != "assistant"]
        answer = next(m["content"] for m in row["messages"] if m["role"] == "assistant")
        category = json.loads(answer)["category"]
        question = [
            *prompt[:-1],
            {"role": "user", "content": f"{ASK}\n\n{prompt[-1]['content']}"},
        ]
        rft.append({"messages": question, "reference_answer": category, "triage": answer})
        wrong = CATEGORIES[(CATEGORIES.index(category) + 1 + i % 4) % len(CATEGORIES)]
        rejected = answer.replace(f'"category": "{category}"', f'"category": "{wrong}"')
        pairs.append({"prompt": prompt, "chosen": answer, "rejected": rejected})
    write(HERE / "support_rft.jsonl", rft)
    write(HERE / "support_pairs.jsonl", pairs)


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
