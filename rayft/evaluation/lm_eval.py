"""`eval.lm_eval`: lm-evaluation-harness tasks, answered by the serving engine.

`EngineLM` is lm-eval's model interface over `TransformersEngine`: log-likelihoods come from
`engine.logits` (the float32 logits of the very model that answers an adapter's requests) and
generations from `engine.generate` (the server's stopping and decoding), so a harness score is
the score of what `rayft serve` runs. Text is tokenized as the server tokenizes a text prompt
(`tokenizer(text)`, the tokenizer's own special tokens), which is also what lm-eval's `hf` model
does by default: the two agree on a task's accuracy (tests/test_lm_eval.py).

Each arm runs `lm_eval.simple_evaluate` in its own Ray task (one model replica, a GPU with
`cluster.use_gpu`), with `log_samples`: the per-document scores of base and candidate are
paired by document, and every metric whose task score is the mean of those per-document scores
(acc, acc_norm, exact_match...) gets a paired bootstrap CI and test, like the test-split
metrics. Corpus-level metrics (perplexity, BLEU, F1) and group scores are reported per arm only.
"""

from __future__ import annotations

import difflib
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from lm_eval.api.model import LM

from rayft.adapters import fingerprint
from rayft.evaluation.arms import Arm
from rayft.evaluation.generate import served_texts
from rayft.evaluation.stats import paired_compare
from rayft.evaluation.testset import EvalError
from rayft.serving.protocol import AdapterRef, GenRequest


def is_task_file(task: str) -> bool:
    """A local task YAML rather than the name of a task lm-eval ships."""
    return task.endswith((".yaml", ".yml"))


class EngineLM(LM):
    """lm-eval's three request types through one serving engine and one adapter (or none)."""

    def __init__(
        self, engine, adapter: AdapterRef | None, batch_size: int, seed: int = 0, label: str = ""
    ) -> None:
        super().__init__()
        self.engine = engine
        self.tok = engine.tokenizer
        self.adapter = adapter
        self.batch_size = batch_size
        self.seed = seed
        self.label = label or (adapter.name if adapter else "base")
        # transformers maps the name on (`n_positions` of GPT-2 and the like).
        self.max_length = engine.model.config.max_position_embeddings
        # What an empty context conditions on, as lm-eval's own models choose it.
        bos = self.tok.bos_token_id
        self.prefix_id = bos if bos is not None else self.tok.eos_token_id

    # ------------------------------------------------------------------ log-likelihoods

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._pair(*r.args) for r in requests]
        return self._score(pairs, "loglikelihood")

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of the model's length.

        The text is tokenized without special tokens and the first window conditions on the
        prefix token: lm-eval's `hf` model adds the tokenizer's BOS as well, and so scores a
        BOS after a BOS for tokenizers that add one.
        """
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, r in enumerate(requests):
            ids = self.tok(r.args[0], add_special_tokens=False)["input_ids"]
            for w in get_rolling_token_windows(ids, self.prefix_id, self.max_length, 1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score(windows, "rolling"), strict=True):
            totals[i] += logprob
        return totals

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, split where lm-eval's models split them: the whole
        text is tokenized once (a token may span the boundary), and trailing spaces of the
        context belong to the continuation (" Paris" is one token, "Paris" after " " is not)."""
        if not context:
            cont = self.tok(continuation, add_special_tokens=False)["input_ids"]
            if cont and cont[0] == self.prefix_id:
                return cont[:1], cont[1:]
            return [self.prefix_id], cont
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok(context + continuation)["input_ids"]
        ctx = self.tok(context)["input_ids"]
        return ctx, whole[len(ctx) :]

    def _score(self, pairs: list[tuple[list[int], list[int]]], what: str) -> list[tuple]:
        """(summed log-probability of each continuation, whether greedy decoding gives it)."""
        import torch

        # The model sees at most max_length tokens (the context loses its oldest ones), and
        # not the last token, which it only predicts. Requests with the same input run once:
        # the choices of a multiple-choice question that are one token each share their input.
        users: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            users.setdefault(tuple((ctx + cont)[-(self.max_length + 1) :][:-1]), []).append(i)
        # Longest first, so a batch pads little and a too-long input fails at once.
        inputs = sorted(users, key=len, reverse=True)
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        bar = self._bar(what, len(pairs))
        for start in range(0, len(inputs), self.batch_size):
            seqs = inputs[start : start + self.batch_size]
            width = max(len(s) for s in seqs)
            ids = torch.tensor([[*s] + [self.engine.pad_id] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            logits = self.engine.logits(ids, mask, self.adapter)
            for row, seq in enumerate(seqs):
                for i in users[seq]:
                    cont = pairs[i][1]
                    if not cont:
                        continue
                    # Position p predicts token p + 1: the continuation's tokens are predicted
                    # by the last len(cont) positions of the (unpadded) input.
                    lp = torch.log_softmax(logits[row, len(seq) - len(cont) : len(seq)], -1)
                    target = torch.tensor(cont, device=lp.device)
                    picked = lp.gather(1, target[:, None]).sum().item()
                    out[i] = (picked, bool((lp.argmax(-1) == target).all()))
                bar.update(len(users[seq]))
        bar.close()
        return out

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests) -> list[str]:
        reqs = [self._gen_request(r) for r in requests]
        order = sorted(range(len(reqs)), key=lambda i: -len(reqs[i].prompt_ids))
        texts = [""] * len(reqs)
        bar = self._bar("generate_until", len(reqs))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for i, text in zip(
                batch, served_texts(self.engine, [reqs[i] for i in batch]), strict=True
            ):
                texts[i] = text
            bar.update(len(batch))
        bar.close()
        return texts

    def _gen_request(self, request) -> GenRequest:
        context, kwargs = request.args
        kw = dict(kwargs)
        until = kw.pop("until", None) or []
        max_new = int(kw.pop("max_gen_toks", 256))
        sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 1.0 if sample else 0.0))
        top_p = float(kw.pop("top_p", 1.0))
        if kw.pop("num_beams", 1) != 1:
            kw["num_beams"] = "> 1"
        if kw:
            raise EvalError(
                f"lm-eval task {request.task_name!r} asks for generation settings the serving "
                f"engine does not take: {sorted(kw)}; it takes until, max_gen_toks, do_sample, "
                "temperature and top_p. Drop the others from the task's generation_kwargs"
            )
        # The prompt keeps its newest tokens, leaving room for the answer (as lm-eval's `hf`).
        ids = self.tok(context)["input_ids"][-max(1, self.max_length - max_new) :]
        return GenRequest(
            ids,
            max_new,
            temperature if sample else 0.0,  # the API's way to ask for greedy decoding
            top_p=top_p,
            stop=[until] if isinstance(until, str) else list(until),
            adapter=self.adapter,
            seed=self.seed,
        )

    def _bar(self, what: str, total: int):
        from ray.experimental.tqdm_ray import tqdm

        return tqdm(desc=f"lm-eval {self.label}: {what}", total=total)


# ---------------------------------------------------------------------- one arm, in Ray


def _metric_key(metric: str, filt: str) -> str:
    return metric if filt == "none" else f"{metric},{filt}"


def _number(x: Any) -> float | None:
    """A score as a float; None for what is not one ("N/A", a corpus metric's (pred, ref))."""
    return float(x) if isinstance(x, bool | int | float | np.number | np.bool_) else None


def run_tasks(
    lm: LM,
    tasks: list[str],
    limit: int | None,
    num_fewshot: int | None,
    bootstrap_iters: int,
) -> dict[str, dict[str, Any]]:
    """`simple_evaluate` on `lm`; per task: its documents, scores and per-document scores."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # lm-eval's own task index takes seconds to build: only when a task is named from it.
    manager = TaskManager(include_defaults=not all(is_task_file(t) for t in tasks))
    res = simple_evaluate(
        lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=True,
        bootstrap_iters=bootstrap_iters,
    )
    out: dict[str, dict[str, Any]] = {}
    for task, row in res["results"].items():
        metrics, stderr = {}, {}
        for key, value in row.items():
            if "," not in key:
                continue  # name, alias, sample_len
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                stderr[_metric_key(metric[: -len("_stderr")], filt)] = _number(value)
            else:
                metrics[_metric_key(metric, filt)] = _number(value)
        per_doc: dict[str, dict[int, float]] = {}
        for sample in res["samples"].get(task, []):
            for metric in sample["metrics"]:
                value = _number(sample.get(metric))
                if value is not None:
                    key = _metric_key(metric, sample["filter"])
                    per_doc.setdefault(key, {})[int(sample["doc_id"])] = value
        higher = res["higher_is_better"].get(task, {})
        out[task] = {
            "n": res["n-samples"].get(task, {}).get("effective"),
            "num_fewshot": res["n-shot"].get(task),
            "metrics": metrics,
            "stderr": stderr,
            "higher_is_better": {k: higher.get(k.split(",")[0]) for k in metrics},
            "per_doc": per_doc,
        }
    return out


@ray.remote(num_cpus=1, runtime_env={"env_vars": {"DISABLE_MULTIPROC": "1"}})
def _score_arm(arm: Arm, tasks, limit, num_fewshot, batch_size, max_lora_rank, seed, iters):
    """One arm in its own worker. lm-eval bootstraps the stderr of corpus metrics in a process
    pool of every core unless DISABLE_MULTIPROC is set: not from inside a Ray worker."""
    from rayft.serving.hf_engine import TransformersEngine

    started = time.time()
    engine = TransformersEngine(arm.model, max_lora_rank=max_lora_rank)
    adapter = fingerprint(arm.name, Path(arm.adapter)) if arm.adapter else None
    lm = EngineLM(engine, adapter, batch_size, seed, arm.name)
    return run_tasks(lm, tasks, limit, num_fewshot, iters), time.time() - started


def score_arms(
    arms: list[Arm],
    tasks: list[str],
    *,
    limit: int | None,
    num_fewshot: int | None,
    batch_size: int,
    max_lora_rank: int,
    seed: int = 0,
    bootstrap_iters: int = 2000,
    use_gpu: bool = False,
) -> dict[str, dict[str, dict[str, Any]]]:
    """lm-eval results of every arm (`run_tasks`), the arms in parallel, one replica each."""
    # Task files are read where the arm runs: hand over paths that do not depend on its cwd.
    tasks = [str(Path(t).resolve()) if is_task_file(t) else t for t in tasks]
    refs = {
        _score_arm.options(num_gpus=1 if use_gpu else 0).remote(
            arm, tasks, limit, num_fewshot, batch_size, max_lora_rank, seed, bootstrap_iters
        ): arm.name
        for arm in arms
    }
    results: dict[str, dict[str, dict[str, Any]]] = {}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        name = refs[done[0]]
        try:
            results[name], seconds = ray.get(done[0])
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, EvalError):  # says what to change: no traceback around it
                raise e.cause from None
            raise
        print(f"[rayft eval] lm-eval {name}: {summary_line(results[name])} ({seconds:.0f} s)")
    return {a.name: results[a.name] for a in arms}


def check_names(tasks: list[str]) -> None:
    """Refuse a task name lm-eval does not know before any arm loads a model."""
    names = [t for t in tasks if not is_task_file(t)]
    if not names:
        return
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise EvalError(
                f"eval.lm_eval.tasks: {name!r} is not a task, group or tag lm-eval ships; "
                f"{hint}`lm-eval ls tasks` lists them, and a local task is a path ending .yaml"
            )


def summary_line(tasks: dict[str, dict[str, Any]]) -> str:
    parts = []
    for task, r in tasks.items():
        shown = ", ".join(f"{m} {v:.3g}" for m, v in r["metrics"].items() if v is not None)
        parts.append(f"{task} {shown} ({r['n']} docs)" if r["n"] else f"{task} {shown}")
    return "; ".join(parts)


# ---------------------------------------------------------------------- base vs candidates


def compare(
    results: dict[str, dict[str, dict[str, Any]]], samples: int, seed: int
) -> dict[str, dict[str, Any]]:
    """The report's `lm_eval.tasks`: per task its scores per arm and, per candidate, a paired
    comparison with the base (the first arm) for every metric with per-document scores that
    average to the task's score."""
    arms = list(results)
    base = results[arms[0]]
    out: dict[str, dict[str, Any]] = {}
    for task, b in base.items():
        entry: dict[str, Any] = {
            "n": b["n"],
            "num_fewshot": b["num_fewshot"],
            "metrics": {a: results[a][task]["metrics"] for a in arms},
            "stderr": {a: results[a][task]["stderr"] for a in arms},
            "higher_is_better": b["higher_is_better"],
            "comparisons": {},
        }
        for metric, value in b["metrics"].items():
            docs = b["per_doc"].get(metric)
            if not docs or value is None or abs(np.mean(list(docs.values())) - value) > 1e-9:
                continue  # no per-document scores, or the task does not average them
            higher = b["higher_is_better"].get(metric)
            for cand in arms[1:]:
                theirs = results[cand][task]["per_doc"].get(metric, {})
                if sorted(theirs) != sorted(docs):
                    raise RuntimeError(
                        f"lm-eval task {task}: {cand} and base were scored on different "
                        f"documents ({len(theirs)} vs {len(docs)}); cannot pair them"
                    )
                ids = sorted(docs)
                x, y = np.array([docs[i] for i in ids]), np.array([theirs[i] for i in ids])
                binary = bool(np.isin(np.concatenate([x, y]), [0.0, 1.0]).all())
                entry["comparisons"].setdefault(cand, {})[metric] = paired_compare(
                    x,
                    y,
                    kind="binary" if binary else "continuous",
                    higher_is_better=higher is not False,
                    samples=samples,
                    seed=seed,
                )
        out[task] = entry
    return out


def flat_comparisons(tasks: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict]]:
    """candidate -> `lm_eval:<task>/<metric>` -> paired comparison (plots, run.json)."""
    flat: dict[str, dict[str, dict]] = {}
    for task, entry in tasks.items():
        for cand, per in entry["comparisons"].items():
            for metric, c in per.items():
                flat.setdefault(cand, {})[f"lm_eval:{task}/{metric}"] = c
    return flat
