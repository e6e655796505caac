"""Pairwise LLM-as-judge through any OpenAI-compatible endpoint.

Each pair is judged twice with the answers' positions swapped; a judge that simply prefers
the first (or second) position then scores a tie, so order bias cancels instead of
masquerading as a difference between the arms.
"""

from __future__ import annotations

import os
import re

from rayft.evaluation.testset import EvalError

_PROMPT = """You compare two answers to the same request. Judge which answer is better: more \
correct, more helpful, and closer to what the request asks for.

[Request]
{prompt}

[Reference answer]
{reference}

[Answer A]
{a}

[Answer B]
{b}

Reply with exactly one word: A, B, or TIE."""

_VERDICT = re.compile(r"\b(A|B|TIE)\b")


def parse_verdict(text: str) -> str:
    """First A / B / TIE in the judge's reply; anything else counts as a tie."""
    m = _VERDICT.search(text.upper())
    return m.group(1) if m else "TIE"


def judge_pairs(
    prompts: list[str],
    references: list[str],
    base: list[str],
    cand: list[str],
    *,
    base_url: str,
    model: str,
    api_key_env: str,
) -> list[float]:
    """Per-example candidate score: 1 = preferred in both orders, 0.5 = tie, 0 = base preferred.

    Identical answers score 0.5 without a call: there is nothing to judge.
    """
    from openai import OpenAI, OpenAIError

    client = OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "none", max_retries=1)

    def ask(prompt: str, reference: str, a: str, b: str) -> str:
        content = _PROMPT.format(prompt=prompt, reference=reference, a=a, b=b)
        try:
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": content}],
                temperature=0,
                max_tokens=4,
            )
        except OpenAIError as e:
            raise EvalError(
                f"eval.judge: the judge at {base_url} (model {model}) failed: {e}. Check "
                f"eval.judge.base_url and the key in ${api_key_env}, or remove eval.judge."
            ) from None
        return parse_verdict(reply.choices[0].message.content or "")

    scores = []
    for p, r, b, c in zip(prompts, references, base, cand, strict=True):
        if b == c:
            scores.append(0.5)
            continue
        first = {"A": 1.0, "B": 0.0, "TIE": 0.5}[ask(p, r, c, b)]  # candidate in position A
        second = {"A": 0.0, "B": 1.0, "TIE": 0.5}[ask(p, r, b, c)]  # candidate in position B
        scores.append((first + second) / 2)
    return scores
