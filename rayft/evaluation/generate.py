"""Score one arm through Ray Data: answers (generation) and teacher-forced NLL per row.

A pool of actors each holds one model replica (`eval.num_replicas`); Ray Data feeds them
batches of rows. One pass per arm does both jobs so each replica loads its model once.

Rows are {idx, kind, prompt, reference}: `kind="test"` rows carry a chat prompt (JSON
messages) and the reference answer; they are answered and the reference is scored. `kind="text"`
rows (the general-text set) have no prompt: only the text's own NLL is computed.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import ray

from rayft.evaluation.arms import Arm


class ArmRunner:
    """Ray Data callable class: one model replica per actor."""

    def __init__(
        self,
        model: str,
        adapter: str | None,
        tokenizer: str,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float,
        seed: int,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(tokenizer)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        # fp32 on CPU; a QLoRA adapter is applied to the unquantized base, which is what a
        # merged export of it serves.
        gpu = torch.cuda.is_available()  # only when Ray gave this actor a GPU
        dtype = torch.bfloat16 if gpu else torch.float32
        net = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        if adapter:
            from peft import PeftModel

            net = PeftModel.from_pretrained(net, adapter)
        self.device = "cuda" if gpu else "cpu"
        self.model = net.to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.temperature = temperature
        self.seed = seed
        eos = net.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos = sorted(eos | {self.tok.eos_token_id})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kinds = list(batch["kind"])
        prompts = [
            self.tok.apply_chat_template(json.loads(p), add_generation_prompt=True, tokenize=False)
            if k == "test"
            else ""
            for k, p in zip(kinds, batch["prompt"], strict=True)
        ]
        nll, ntok = self._nll(prompts, list(batch["reference"]))
        answers = [""] * len(kinds)
        todo = [i for i, k in enumerate(kinds) if k == "test"]
        if todo:
            # Seed from the batch's first row, not the actor: sampled answers then do not
            # depend on which replica happened to get the batch.
            self.torch.manual_seed(self.seed * 1_000_003 + int(batch["idx"][todo[0]]))
            for i, text in zip(todo, self._generate([prompts[i] for i in todo]), strict=True):
                answers[i] = text
        return {
            "idx": batch["idx"],
            "kind": batch["kind"],
            "answer": np.array(answers, dtype=object),
            "nll_sum": np.array(nll, dtype=np.float64),
            "n_tokens": np.array(ntok, dtype=np.int64),
        }

    def _nll(self, prompts: list[str], targets: list[str]) -> tuple[list[float], list[int]]:
        """Summed NLL of each target's tokens given its prompt (answer tokens only)."""
        torch = self.torch
        seqs, labels = [], []
        for prompt, target in zip(prompts, targets, strict=True):
            p = self.tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
            t = self.tok(target, add_special_tokens=False)["input_ids"]
            lab = [-100] * len(p) + t
            if not p:
                lab[0] = -100  # plain text: the first token has no context to predict it from
            seqs.append(p + t)
            labels.append(lab)
        width = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
        with torch.inference_mode():
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits.float()
        lab = lab.to(self.device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), lab[:, 1:], ignore_index=-100, reduction="none"
        )
        return losses.sum(1).cpu().tolist(), (lab[:, 1:] != -100).sum(1).cpu().tolist()

    def _generate(self, prompts: list[str]) -> list[str]:
        self.tok.padding_side = "left"  # decoder-only models continue from the right edge
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self.device)
        kwargs: dict[str, Any] = {"do_sample": self.do_sample}
        if self.do_sample:
            kwargs["temperature"] = self.temperature
        with self.torch.inference_mode():
            out = self.model.generate(
                **enc,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tok.pad_token_id,
                eos_token_id=self.eos,
                **kwargs,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        return [t.strip() for t in self.tok.batch_decode(new, skip_special_tokens=True)]


def score_arm(
    rows: list[dict[str, Any]],
    arm: Arm,
    *,
    max_new_tokens: int,
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
            "adapter": arm.adapter,
            "tokenizer": arm.tokenizer,
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "temperature": temperature,
            "seed": seed,
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
