"""How the transformers engine picks each token: per row, with each request's own rules.

`Decoder` is the only logits processor `generate` runs (the engine clears the model's own
generation defaults and decodes greedily), and it picks every row's token itself: it records
the model's log-probabilities (the raw logits, before anything below changes them), applies
the request's logit bias, penalties and grammar mask, then either takes the best token
(temperature 0) or samples after temperature, min-p, top-k and top-p (vLLM's order), with the
row's own seeded generator. It answers with a score row that allows only that token, so the
greedy step of `generate` takes it. Rows with different sampling settings, seeds, grammars and
log-probability requests therefore share one batch, and a seed gives the same answer whatever
batch its request lands in.
"""

from __future__ import annotations

import random

import torch
from transformers import StoppingCriteria

from rayft.serving.protocol import GenRequest, TokenLogprob


class Row:
    """One request's decoding state."""

    def __init__(self, req: GenRequest, eos_ids: list[int], matcher=None, decode=None):
        self.req = req
        self.eos_ids = eos_ids
        self.error: Exception | None = None  # set when this row alone failed (Decoder)
        self.matcher = matcher  # grammar.Matcher or None
        # Stop strings end the row as soon as its text holds one (the answer is cut there
        # later); `decode(ids)` is the tokenizer's. The last `span` tokens cover any stop.
        self.decode = decode if req.stop else None
        self.span = max((len(s) for s in req.stop), default=0) + 8
        if req.temperature < 0 or not 0 < req.top_p <= 1 or not 0 <= req.min_p <= 1:
            raise ValueError(
                f"invalid sampling settings: temperature {req.temperature}, top_p {req.top_p}, "
                f"min_p {req.min_p}"
            )
        seed = req.seed if req.seed is not None else random.SystemRandom().getrandbits(63)
        self.gen = torch.Generator().manual_seed(seed % 2**64)
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.counts: dict[int, int] = {}
        self.finished = False
        self.bias = None
        if req.logit_bias:
            self.bias = (
                torch.tensor(list(req.logit_bias), dtype=torch.long),
                torch.tensor(list(req.logit_bias.values()), dtype=torch.float32),
            )
        self.seen = set(req.prompt_ids) if req.repetition_penalty != 1.0 else set()
        # Greedy with nothing to apply or record: the Decoder batches these rows' argmax.
        self.plain = (
            req.temperature == 0
            and req.logprobs is None
            and matcher is None
            and self.bias is None
            and not (req.presence_penalty or req.frequency_penalty)
            and req.repetition_penalty == 1.0
        )

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's float32 `logits` (one row of the step's scores)."""
        r = self.req
        if r.logprobs is not None:  # log-softmax without writing it out: logits - logsumexp
            self._pending = (logits, torch.logsumexp(logits, -1))
        x = logits
        if self.bias is not None or self.counts or self.seen or self.matcher is not None:
            x = x.clone()
        if self.bias is not None:
            x.index_add_(0, self.bias[0], self.bias[1])
        if r.repetition_penalty != 1.0 and self.seen:
            idx = torch.tensor(sorted(self.seen), dtype=torch.long)
            v = x[idx]
            x[idx] = torch.where(v > 0, v / r.repetition_penalty, v * r.repetition_penalty)
        if (r.presence_penalty or r.frequency_penalty) and self.counts:
            idx = torch.tensor(list(self.counts), dtype=torch.long)
            n = torch.tensor(list(self.counts.values()), dtype=torch.float32)
            x[idx] -= r.frequency_penalty * n + r.presence_penalty
        if self.matcher is not None:
            allowed = self.matcher.mask()
            x.masked_fill_(~allowed, float("-inf"))
            if not torch.isfinite(x).any():  # the bias banned every token the grammar allows
                x = torch.where(allowed, logits, float("-inf"))
        token = int(torch.argmax(x)) if r.temperature == 0 else self._sample(x)
        self._accept(token)
        return token

    def _sample(self, x: torch.Tensor) -> int:
        r = self.req
        probs = torch.softmax(x / r.temperature, -1)
        if r.min_p > 0:
            probs = torch.where(probs >= r.min_p * probs.max(), probs, 0.0)
        if r.top_k > 0 and r.top_k < probs.numel():
            kth = torch.topk(probs, r.top_k).values[-1]
            probs = torch.where(probs >= kth, probs, 0.0)
        if r.top_p < 1.0:
            probs = top_p(probs, r.top_p)
        # Inverse-CDF draw with the row's own generator (torch.multinomial's checks over the
        # whole vocabulary cost several times more per row and step).
        cdf = torch.cumsum(probs, 0)
        u = torch.rand((), generator=self.gen) * cdf[-1]
        return min(int(torch.searchsorted(cdf, u, right=True)), probs.numel() - 1)

    def _accept(self, token: int) -> None:
        if self.req.logprobs is not None:
            logits, lse = self._pending
            top = []
            if self.req.logprobs > 0:
                values, ids = torch.topk(logits, self.req.logprobs)
                top = list(zip(ids.tolist(), (values - lse).tolist(), strict=True))
            self.logprobs.append(TokenLogprob(token, float(logits[token] - lse), top))
        self.tokens.append(token)
        if token in self.eos_ids or len(self.tokens) >= self.req.max_tokens:
            self.finished = True
            return
        if self.decode is not None:
            tail = self.decode(self.tokens[-self.span :])
            if any(stop in tail for stop in self.req.stop):
                self.finished = True
                return
        if self.req.presence_penalty or self.req.frequency_penalty:
            self.counts[token] = self.counts.get(token, 0) + 1
        if self.req.repetition_penalty != 1.0:
            self.seen.add(token)
        if self.matcher is not None:
            self.matcher.accept(token)


def top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """`probs` with only the nucleus kept: a token stays while the mass of the better tokens is
    below p of the total (vLLM's rule). The best k tokens are enough almost always: k grows
    from 64 until they hold p of the mass, instead of sorting the whole vocabulary (49k: ~10 ms
    a row and step on one core)."""
    total, n, k = probs.sum(), probs.numel(), 64
    while True:
        k = min(k, n)
        values, ids = torch.topk(probs, k)  # sorted, best first
        if k == n or values.sum() >= p * total:
            break
        k = k * 4 if k * 16 <= n else n  # a flat distribution: sort it all at once
    keep = (torch.cumsum(values, 0) - values) < p * total
    return torch.zeros_like(probs).scatter_(0, ids[keep], values[keep])


class Decoder:
    """The logits processor of one `generate` call: row i of the batch is `rows[i]`."""

    def __init__(self, rows: list[Row], pad_id: int):
        self.rows = rows
        self.pad_id = pad_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float()
        if logits.device.type != "cpu":
            logits = logits.cpu()
        # Plain greedy rows (no rule, no log-probabilities) take one batched argmax.
        plain = [i for i, row in enumerate(self.rows) if row.plain and not row.finished]
        best = logits[plain].argmax(-1).tolist() if plain else []
        picked = dict(zip(plain, best, strict=True))
        tokens = []
        for i, row in enumerate(self.rows):
            # A finished row only receives padding from here on (generate pads rows past EOS).
            if row.finished:
                tokens.append(self.pad_id)
                continue
            try:
                if i in picked:
                    row._accept(picked[i])
                    tokens.append(picked[i])
                else:
                    tokens.append(row.choose(logits[i]))
            except Exception as e:  # this row fails alone; the batch goes on
                row.error, row.finished = e, True
                tokens.append(self.pad_id)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(tokens)), torch.tensor(tokens, device=out.device)] = 0.0
        return out


class Finished(StoppingCriteria):
    """`generate`'s stopping rule: a row is done when its Row says so (EOS, its own max_tokens,
    a stop string); the batch ends when every row is."""

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.tensor([row.finished for row in self.rows], device=input_ids.device)


def prompt_logprobs(logits: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it (teacher-forced `logits`
    of the prompt alone, [len(ids), V]), with the k most likely; the first has none."""
    lp = torch.log_softmax(logits.float(), -1)
    out: list[TokenLogprob | None] = [None]
    for pos in range(1, len(ids)):
        row = lp[pos - 1]
        top = []
        if k > 0:
            values, top_ids = torch.topk(row, k)
            top = list(zip(top_ids.tolist(), values.tolist(), strict=True))
        out.append(TokenLogprob(ids[pos], float(row[ids[pos]]), top))
    return out


def cut_at_stop(text: str, stops: list[str]) -> str | None:
    """`text` up to the earliest stop string, or None when none occurs."""
    hits = [text.index(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else None
