"""Score one arm through Ray Data: answers (generation) and teacher-forced NLL per row.

A pool of actors each holds one serving engine (`eval.num_replicas`); Ray Data feeds them
batches of rows. Answers come from the transformers engine that `rayft serve` runs by default,
with the server's prompt rendering, stopping and decoding, so an evaluated answer is the answer
that server gives (a vLLM server, or `serve.dora: merge`, answers from other kernels or a merged
copy: close, not identical); the NLL pass runs on that engine's model (`engine.logits`), so each
replica loads one model.

Rows are {idx, kind, prompt, reference}: `kind="test"` rows carry a chat prompt (JSON
messages) and the reference answer ("" for prompt rows of grpo data, which have none); they are
answered and the reference is scored. `kind="text"`
rows (the general-text set) have no prompt: only the text's own NLL is computed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import ray

from rayft.adapters import fingerprint
from rayft.evaluation.arms import Arm
from rayft.evaluation.testset import EvalError
from rayft.serving.errors import ServeError
from rayft.serving.prompts import chat_prompt_ids
from rayft.serving.protocol import AdapterRef, GenRequest


class ArmRunner:
    """Ray Data callable class: one engine (one model replica) per actor."""

    def __init__(
        self,
        model: str,
        adapter: AdapterRef | None,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float,
        seed: int,
        max_lora_rank: int,
    ) -> None:
        import torch

        from rayft.serving.hf_engine import TransformersEngine

        self.torch = torch
        # The engine picks the device (a GPU only when Ray gave this actor one) and the dtype.
        # A QLoRA adapter is applied to the unquantized base, as the server applies it.
        self.engine = TransformersEngine(model, max_lora_rank=max_lora_rank)
        self.tok = self.engine.tokenizer
        self.adapter = adapter
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature if do_sample else 0.0  # the API's way to ask for greedy
        self.seed = seed
        if adapter:  # an adapter the engine refuses fails here, once, not in every batch
            served_texts(self.engine, [GenRequest([self.engine.pad_id], 1, 0.0, adapter=adapter)])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kinds = list(batch["kind"])
        prompts = [
            chat_prompt_ids(self.tok, json.loads(p)) if k == "test" else []
            for k, p in zip(kinds, batch["prompt"], strict=True)
        ]
        answers = [""] * len(kinds)
        todo = [i for i, k in enumerate(kinds) if k == "test"]
        if todo:
            # Seed from the batch's first row, not the actor: sampled answers then do not
            # depend on which replica happened to get the batch. One seed for the whole batch:
            # the engine seeds once per group of requests sharing a seed, so the batch stays one
            # `generate` call.
            seed = self.seed * 1_000_003 + int(batch["idx"][todo[0]])
            reqs = [
                GenRequest(
                    prompts[i],
                    self.max_new_tokens,
                    self.temperature,
                    adapter=self.adapter,
                    seed=seed,
                )
                for i in todo
            ]
            for i, text in zip(todo, served_texts(self.engine, reqs), strict=True):
                answers[i] = text
        nll, ntok = self._nll(prompts, list(batch["reference"]))
        return {
            "idx": batch["idx"],
            "kind": batch["kind"],
            "answer": np.array(answers, dtype=object),
            "nll_sum": np.array(nll, dtype=np.float64),
            "n_tokens": np.array(ntok, dtype=np.int64),
        }

    def _nll(self, prompts: list[list[int]], targets: list[str]) -> tuple[list[float], list[int]]:
        """Summed NLL of each target's tokens given its prompt (answer tokens only); 0 over 0
        tokens for an empty target (a prompt row has no reference), without a forward pass."""
        nll, ntok = [0.0] * len(targets), [0] * len(targets)
        todo = [i for i, t in enumerate(targets) if t]
        if todo:
            sums, counts = self._nll_of([prompts[i] for i in todo], [targets[i] for i in todo])
            for i, s, c in zip(todo, sums, counts, strict=True):
                nll[i], ntok[i] = s, c
        return nll, ntok

    def _nll_of(self, prompts: list[list[int]], targets: list[str]) -> tuple[list, list]:
        torch = self.torch
        seqs, labels = [], []
        for p, target in zip(prompts, targets, strict=True):
            t = self.tok(target, add_special_tokens=False)["input_ids"]
            lab = [-100] * len(p) + t
            if not p:
                lab[0] = -100  # plain text: the first token has no context to predict it from
            seqs.append(p + t)
            labels.append(lab)
        width = max(len(s) for s in seqs)
        pad = self.engine.pad_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
        logits = self.engine.logits(ids, mask, self.adapter)
        device = logits.device
        lab = lab.to(device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), lab[:, 1:], ignore_index=-100, reduction="none"
        )
        return losses.sum(1).cpu().tolist(), (lab[:, 1:] != -100).sum(1).cpu().tolist()


def served_texts(engine, reqs: list[GenRequest]) -> list[str]:
    out = engine.generate(reqs)
    failed = next((r for r in out if isinstance(r, ServeError)), None)
    if failed is not None:
        raise EvalError(f"the serving engine refused the arm's requests: {failed.message}")
    return [r.text for r in out]


def score_arm(
    rows: list[dict[str, Any]],
    arm: Arm,
    *,
    max_new_tokens: int,
    max_lora_rank: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    num_replicas: int = 1,
    use_gpu: bool = False,
) -> list[dict[str, Any]]:
    """Answers and NLL for every row, in the order of `rows` (by `idx`)."""
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))
    out = ds.map_batches(
        ArmRunner,
        fn_constructor_kwargs={
            "model": arm.model,
            "adapter": fingerprint(arm.name, Path(arm.adapter)) if arm.adapter else None,
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "temperature": temperature,
            "seed": seed,
            "max_lora_rank": max_lora_rank,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_replicas),
        num_cpus=1,
        num_gpus=1 if use_gpu else 0,
    )
    results = sorted(out.take_all(), key=lambda r: int(r["idx"]))
    if [int(r["idx"]) for r in results] != [int(r["idx"]) for r in rows]:
        raise RuntimeError(f"arm {arm.name}: Ray Data returned {len(results)} of {len(rows)} rows")
    return results
