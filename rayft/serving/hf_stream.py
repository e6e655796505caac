"""Streaming for the transformers engine: the texts and log-probabilities of a batch's
streaming rows as each decoding step produces them (`stream_batch`), fed by `StepStreamer`,
which `generate` calls with every step's tokens."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator

import torch

from rayft.serving.errors import EngineFailed, ServeError
from rayft.serving.protocol import Delta, GenRequest, GenResult, TokenLogprob
from rayft.serving.sampling import Row, cut_at_stop


def stream_batch(
    engine, requests: list[GenRequest]
) -> Iterator[list[Delta | GenResult | ServeError | None]]:
    """`generate` for a batch in which some requests stream: yields one entry per request
    at a time: a Delta (empty when there is nothing new; always empty for requests that do
    not stream), then the request's GenResult or ServeError once, then None. Generation
    runs in a thread (under the model lock); steps that pile up between two reads become
    one entry, so a slow reader costs nothing but latency."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    end = object()

    def work() -> None:
        try:
            engine.generate(requests, on_step=lambda rows, x: events.put((rows, x)))
        except BaseException as e:  # re-raised in the reader, which owns the requests
            events.put((None, e))
        events.put((None, end))

    threading.Thread(target=work, daemon=True).start()
    n = len(requests)
    tokens: list[list[int]] = [[] for _ in requests]
    lps: list[list[TokenLogprob]] = [[] for _ in requests]
    shown = [0] * n  # characters of text already yielded
    lp_sent = [0] * n  # log-probabilities already yielded
    final: list[GenResult | ServeError | None] = [None] * n
    sent = [False] * n
    finished = False
    while not finished:
        pending = [events.get()]
        with contextlib.suppress(queue.Empty):
            while True:
                pending.append(events.get_nowait())
        for rows, x in pending:
            if rows is None:
                if x is end:
                    finished = True
                    continue
                raise x
            if isinstance(rows, int):
                final[rows] = x
                continue
            step_tokens, step_lps = x
            for i, t, new in zip(rows, step_tokens, step_lps, strict=True):
                tokens[i].append(t)
                lps[i].extend(new)
        out: list[Delta | GenResult | ServeError | None] = []
        for i, r in enumerate(requests):
            if sent[i]:
                out.append(None)
            elif final[i] is not None:
                res = final[i]
                if r.stream and isinstance(res, GenResult):
                    rest = (res.logprobs or [])[lp_sent[i] :]
                    if len(res.text) > shown[i] or rest:
                        out.append(Delta(res.text[shown[i] :], rest))  # the rest first
                        shown[i], lp_sent[i] = len(res.text), len(res.logprobs or [])
                        continue
                out.append(res)
                sent[i] = True
            elif r.stream:
                text = partial(engine, r, tokens[i])
                piece = text[shown[i] :]
                shown[i] = max(shown[i], len(text))
                # Log-probabilities go out with their token's text, never ahead of it.
                k = lp_sent[i]
                while k < len(lps[i]) and _shown(engine, tokens[i], k + 1, shown[i], r):
                    k += 1
                out.append(Delta(piece, lps[i][lp_sent[i] : k]))
                lp_sent[i] = k
            else:
                out.append(Delta(""))
        if any(x is not None for x in out):  # all None: every row was answered already
            yield out
    if not all(sent):  # the summaries of rows whose last text came with the end
        yield [None if sent[i] else final[i] for i in range(n)]


def _shown(engine, tokens: list[int], m: int, shown: int, r: GenRequest) -> bool:
    """Whether the text of the first `m` tokens has been shown (`shown` characters)."""
    if tokens[m - 1] in engine.eos_ids:
        return False
    return len(engine._decode(tokens[:m], r)) <= shown


def partial(engine, r: GenRequest, tokens: list[int]) -> str:
    """The text of an unfinished answer that is safe to show: without a trailing run of
    whitespace (a tokenizer's clean-up may still join it to what comes next, " ." -> ".") or
    of incomplete UTF-8 ("\ufffd"), and without anything that could still become the start of
    a stop string."""
    tokens, _ = engine._until_eos(tokens)
    text = engine._decode(tokens[: r.max_tokens], r)
    cut = cut_at_stop(text, r.stop)
    if cut is not None:
        return cut
    end = len(text.rstrip().rstrip("\ufffd"))
    hold = max((len(s) for s in r.stop), default=1) - 1
    return text[: max(0, min(end, len(text) - hold))]


class StepStreamer:
    """What `generate(streamer=)` calls: the prompt once (skipped), then each step's new token
    per row. Not TextStreamer: that one takes batch size 1 only.

    A row that reaches EOS, its own max_tokens or a stop string is answered at once
    (`on_step(i, result)`),
    not when the longest row of its group is done: its result cannot change any more (rows
    past EOS only get padding), and a short stream should not wait for a long neighbour."""

    def __init__(self, rows: list[int], reqs: list[GenRequest], on_step, engine):
        self.rows, self.reqs, self.on_step, self.engine = rows, reqs, on_step, engine
        self.prompt = True
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.answered: list[GenResult | None] = [None] * len(rows)
        self.rows_state: list[Row] = []  # the Decoder's rows, set by the engine's `_run`
        self.prompt_lps: list = [None] * len(rows)  # set there too

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:
            self.prompt = False
            return
        step = value.reshape(-1).tolist()
        new = []
        for j in range(len(step)):
            done = self.answered[j] is not None
            state = self.rows_state[j]
            # The Decoder recorded this step's log-probability of a live row.
            new.append([] if done or state.req.logprobs is None else state.logprobs[-1:])
        self.on_step(self.rows, (step, new))
        for j, t in enumerate(step):
            if self.answered[j] is not None:
                continue
            self.tokens[j].append(t)
            state = self.rows_state[j]
            if state.error is not None:  # this row alone failed
                self.answered[j] = group_error([self.reqs[j]], state.error)
            elif state.finished:  # EOS, its max_tokens or a stop string
                self.answered[j] = self.engine._result(
                    self.reqs[j], self.tokens[j], state.logprobs, self.prompt_lps[j]
                )
            else:
                continue
            self.on_step(self.rows[j], self.answered[j])

    def end(self) -> None:
        pass


def group_error(group: list[GenRequest], e: Exception) -> ServeError:
    if isinstance(e, ServeError):
        return e
    names = sorted({r.adapter.name if r.adapter else "base" for r in group})
    return EngineFailed(
        f"generation failed for the {len(group)} request(s) of one batch group (model/adapter "
        f"{', '.join(names)}; temperature {group[0].temperature}, top_p {group[0].top_p}): "
        f"{type(e).__name__}: {e}"[:800]
        + ". Other requests of the batch were answered; retry, and report it if it persists",
    )
