"""text_similarity's metrics, each a score in [0, 1] of an answer against its reference.

ROUGE and BLEU come from rouge-score and sacrebleu (as rayft eval's metrics do) so the numbers
match what other tools report. meteor (nltk's WordNet data) and cosine (an embedding model)
would each need a download rayft does not make, so they are refused when the grader is built
instead of scoring something else under their name.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Callable
from functools import cache

import sacrebleu

try:  # OpenAI's fuzzy_match is rapidfuzz's; rayft does not depend on it, so use it if present.
    from rapidfuzz import fuzz as _rapidfuzz
except ImportError:  # pragma: no cover - depends on the environment
    _rapidfuzz = None

UNAVAILABLE = {
    "meteor": "needs nltk's WordNet data, which rayft does not download",
    "cosine": "needs an embedding model, which rayft does not run for graders",
}


def fuzzy_match(answer: str, reference: str) -> float:
    """rapidfuzz's WRatio / 100 when rapidfuzz is installed, else difflib's ratio (close on
    near-identical strings, lower than WRatio when one string contains the other)."""
    if _rapidfuzz is not None:
        return _rapidfuzz.WRatio(answer, reference) / 100
    # autojunk off: on strings over 200 characters it drops frequent characters, which made
    # two long near-identical answers score far apart.
    return difflib.SequenceMatcher(None, answer, reference, autojunk=False).ratio()


def bleu(answer: str, reference: str) -> float:
    """sacrebleu sentence BLEU / 100 (its default tokenizer and exponential smoothing)."""
    return min(1.0, sacrebleu.sentence_bleu(answer, [reference]).score / 100)


def gleu(answer: str, reference: str) -> float:
    """Google-BLEU (Wu et al. 2016, nltk's sentence_gleu): over all 1- to 4-grams of
    whitespace tokens, min(precision, recall) of the n-grams the two share."""
    ours, theirs = _ngrams(answer.split()), _ngrams(reference.split())
    total = max(sum(ours.values()), sum(theirs.values()))
    return sum((ours & theirs).values()) / total if total else 0.0


def _ngrams(tokens: list[str]) -> Counter:
    return Counter(
        tuple(tokens[i : i + n]) for n in range(1, 5) for i in range(len(tokens) - n + 1)
    )


def rouge(kind: str) -> Callable[[str, str], float]:
    """ROUGE-N or ROUGE-L F-measure; rouge-score's tokenizer: lower case, alphanumerics."""

    def score(answer: str, reference: str) -> float:
        return _scorer(kind).score(reference, answer)[kind].fmeasure

    return score


@cache
def _scorer(kind: str):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind])


METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": fuzzy_match,
    "bleu": bleu,
    "gleu": gleu,
    **{f"rouge_{n}": rouge(f"rouge{n}") for n in range(1, 6)},
    "rouge_l": rouge("rougeL"),
}
