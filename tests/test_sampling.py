"""The transformers engine's per-row decoder (rayft.serving.sampling) against the definitions it
follows (vLLM's): nucleus, min-p, top-k, penalties, bias, seeds, raw log-probabilities."""

from __future__ import annotations

import pytest
import torch

from rayft.serving.protocol import GenRequest
from rayft.serving.sampling import Row, top_p


def nucleus_by_sorting(probs: torch.Tensor, p: float) -> torch.Tensor:
    """The textbook rule over the whole sorted vocabulary."""
    sp, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sp, 0) - sp
    sp = torch.where(before < p * sp.sum(), sp, 0.0)
    return torch.zeros_like(probs).scatter_(0, order, sp)


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0, 12.0])  # flat to peaked distributions
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_nucleus_the_full_sort_keeps(scale, p):
    g = torch.Generator().manual_seed(int(scale * 100 + p * 10))
    probs = torch.softmax(torch.randn(49152, generator=g) * scale, -1)
    assert torch.equal(top_p(probs, p), nucleus_by_sorting(probs, p))


def choose(logits: list[float], **kw) -> tuple[int, Row]:
    row = Row(GenRequest([0], 8, **kw), eos_ids=[99])
    return row.choose(torch.tensor(logits)), row


def test_rules_change_the_pick_as_defined():
    base = [2.0, 1.9, 0.0, -1.0]
    assert choose(base, temperature=0.0)[0] == 0
    assert choose(base, temperature=0.0, logit_bias={1: 0.2})[0] == 1
    # top_k=1 and min_p=1 leave only the best token, whatever the seed
    for seed in range(20):
        assert choose(base, temperature=1.0, seed=seed, top_k=1)[0] == 0
        assert choose(base, temperature=1.0, seed=seed, min_p=1.0)[0] == 0
    # presence / frequency count the answer's tokens, not the prompt's: once token 0 was
    # answered, 2.0 - 0.2 < 1.9
    for penalty in ({"frequency_penalty": 0.2}, {"presence_penalty": 0.2}):
        first, row = choose(base, temperature=0.0, **penalty)
        assert first == 0 and row.choose(torch.tensor(base)) == 1
    # repetition_penalty divides positive logits of seen tokens (prompt included)
    row = Row(GenRequest([0], 8, temperature=0.0, repetition_penalty=2.0), eos_ids=[99])
    assert row.choose(torch.tensor(base)) == 1  # token 0 is in the prompt: 2.0 / 2 < 1.9


def test_seeded_rows_reproduce_and_differ_by_seed():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))

    def run(seed: int) -> list[int]:
        row = Row(GenRequest([0], 50, temperature=1.0, seed=seed), eos_ids=[5000])
        return [row.choose(logits) for _ in range(20)]

    assert run(1) == run(1) and run(1) != run(2)


def test_logprobs_are_raw_whatever_the_rules():
    logits = torch.tensor([3.0, 1.0, 0.5, -2.0])
    token, row = choose(logits.tolist(), temperature=0.7, seed=3, logprobs=2, logit_bias={3: 50.0})
    assert token == 3  # the bias picked it
    raw = torch.log_softmax(logits, -1)
    lp = row.logprobs[0]
    assert lp.logprob == pytest.approx(raw[3].item(), abs=1e-6)
    assert [t for t, _ in lp.top] == [0, 1]
    assert [v for _, v in lp.top] == pytest.approx(raw[:2].tolist(), abs=1e-6)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        Row(GenRequest([0], 1, temperature=-1.0), eos_ids=[1])
