"""Text metrics of one answer against its reference.

ROUGE-L and BLEU come from rouge-score and sacrebleu so the numbers match what other papers and
tools report; exact match and token F1 are the SQuAD definitions, small enough to write out.
"""

from __future__ import annotations

import re
from collections import Counter

import sacrebleu
from rouge_score import rouge_scorer

_SCORER = rouge_scorer.RougeScorer(["rougeL"])


def normalize(text: str) -> str:
    """Collapse whitespace and trim: answers differing only in spacing count as equal."""
    return re.sub(r"\s+", " ", text).strip()


def exact_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


def token_f1(answer: str, reference: str) -> float:
    """F1 over lower-cased whitespace tokens (multiset overlap), as in SQuAD."""
    pred, ref = normalize(answer).lower().split(), normalize(reference).lower().split()
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score's default tokenizer: lower case, alphanumerics)."""
    return _SCORER.score(reference, answer)["rougeL"].fmeasure


def sentence_bleu(answer: str, reference: str) -> float:
    """sacrebleu sentence BLEU (0-100, exponential smoothing) for per-example comparison."""
    return sacrebleu.sentence_bleu(answer, [reference]).score


def corpus_bleu(answers: list[str], references: list[str]) -> float:
    """sacrebleu corpus BLEU (0-100): the number to quote for an arm as a whole."""
    return sacrebleu.corpus_bleu(answers, [references]).score


def text_metrics(answer: str, reference: str) -> dict[str, float]:
    return {
        "exact_match": exact_match(answer, reference),
        "token_f1": token_f1(answer, reference),
        "rouge_l": rouge_l(answer, reference),
        "bleu": sentence_bleu(answer, reference),
    }
