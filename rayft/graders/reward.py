"""rayft's `reward_model` grader: a reward model that `rayft train` trained (objective `reward`)
scores each answer, in its conversation, as sigmoid(score) in [0, 1].

The conversation is the sample's `prompt` messages (GRPO passes each rollout's prompt; `rayft
eval` its test row's) followed by the answer as the assistant turn, or the grader's own `input`
message templates when it gives them. The model is loaded once per process, on CPU or the
first GPU, from a local directory: a PEFT adapter (adapter_config.json names its base) or a full
model, safetensors only.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayft.graders.spec import GraderError, SampleError
from rayft.graders.templates import Template, compile_template

BATCH = 16


@dataclass(frozen=True)
class RewardModel:
    path: str
    input: tuple[tuple[str, Template], ...]  # (role, content template); () = sample's prompt

    def batch(self, samples: list[dict], items: list[dict]) -> tuple[list, list]:
        scores: list[float] = [0.0] * len(samples)
        errors: list[str | None] = [None] * len(samples)
        chats, where = [], []
        for k, (sample, item) in enumerate(zip(samples, items, strict=True)):
            try:
                chats.append(self._conversation(sample, item))
                where.append(k)
            except SampleError as e:
                errors[k] = str(e)
        for k, score in zip(where, score_conversations(self.path, chats), strict=True):
            scores[k] = 1 / (1 + math.exp(-score))
        return scores, errors

    def _conversation(self, sample: dict, item: dict) -> list[dict[str, str]]:
        if self.input:
            return [{"role": r, "content": t.render(sample, item)} for r, t in self.input]
        prompt = sample.get("prompt")
        if not isinstance(prompt, list) or not prompt:
            raise SampleError(
                "reward_model: the sample carries no prompt messages; give the grader an "
                "`input` list of messages"
            )
        return [*prompt, {"role": "assistant", "content": sample["output_text"]}]


def build_reward_model(s: dict, where: str) -> RewardModel:
    path = s.get("path")
    if not isinstance(path, str) or not path:
        raise GraderError(f"{where}.path: the directory `rayft train` wrote, e.g. runs/rm/adapter")
    root = Path(path)
    if not (root / "adapter_config.json").exists() and not (root / "config.json").exists():
        raise GraderError(
            f"{where}.path: {path} holds no adapter_config.json or config.json: point it at the "
            "adapter/ (or model/) directory of a run trained with training.objective: reward"
        )
    if not list(root.glob("*.safetensors")):
        raise GraderError(f"{where}.path: {path} has no .safetensors weights (only those load)")
    turns = s.get("input", [])
    if not isinstance(turns, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in turns
    ):
        raise GraderError(f"{where}.input: a list of {{role, content}} message templates")
    compiled = tuple(
        (m["role"], compile_template(m.get("content", ""), f"{where}.input[{i}].content"))
        for i, m in enumerate(turns)
    )
    return RewardModel(str(root.resolve()), compiled)


def score_conversations(path: str, chats: list[list[dict[str, str]]]) -> list[float]:
    """The reward model's raw score of each conversation (higher is better)."""
    import torch

    model, tok = _load(path)
    out: list[float] = []
    for start in range(0, len(chats), BATCH):
        texts = [tok.apply_chat_template(c, tokenize=False) for c in chats[start : start + BATCH]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with torch.no_grad():
            out += model(**enc).logits[:, 0].float().tolist()
    return out


def pairwise_accuracy(path: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How often the reward model scores `chosen` above `rejected` for the same prompt, with a
    95% Wilson interval: `rows` are prepared preference rows (prompt messages, chosen,
    rejected)."""
    chats = []
    for r in rows:
        prompt = json.loads(r["prompt"]) if isinstance(r["prompt"], str) else r["prompt"]
        for answer in (r["chosen"], r["rejected"]):
            chats.append([*prompt, {"role": "assistant", "content": answer}])
    scores = score_conversations(path, chats)
    wins = sum(scores[i] > scores[i + 1] for i in range(0, len(scores), 2))
    n = len(rows)
    return {"n": n, "accuracy": wins / n if n else None, "ci95": wilson(wins, n)}


def wilson(wins: int, n: int, z: float = 1.96) -> list[float] | None:
    if n == 0:
        return None
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 4), round(centre + half, 4)]


@functools.lru_cache(maxsize=2)
def _load(path: str):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = Path(path)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    adapter = root / "adapter_config.json"
    if adapter.exists():
        from peft import PeftModel

        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=1, use_safetensors=True
        )
        model = PeftModel.from_pretrained(model, path)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, use_safetensors=True
        )
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    return model.to(device).eval(), tok
