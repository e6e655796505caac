"""`rayft train` end to end: SFT + LoRA on 2 CPU workers of a real local Ray, tiny-llama.

One uninterrupted reference run is shared by the module. The interrupted runs (a worker
SIGKILLed mid-run, a worker dying while it uploads a checkpoint) must replay its trajectory: same
loss at every step after the restore, which only holds when weights, optimizer, scheduler, RNG
and the data position (mid-epoch) all come back exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_data import write_sft

from rayft.config import JobConfig
from rayft.training import TrainingFailedError, train

pytestmark = pytest.mark.slow

STEPS = 6
# Same data order, weights, optimizer, scheduler and dropout RNG give the same arithmetic; what
# can differ is the summation order of float reductions (observed differences ~1e-7), so a
# relative 1e-4 is tight enough that replaying one wrong batch (losses differ by >1e-2) fails.
REL_TOL = 1e-4


def _config(run_dir, **training) -> JobConfig:
    t = {
        "method": "lora",
        "max_steps": STEPS,
        "learning_rate": 1e-2,
        # Constant: a resume that raises max_steps keeps the LR of the steps already taken.
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "per_device_batch_size": 2,
        "save_steps": 3,
        "eval_steps": 3,
        "keep_checkpoints": 1,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        **training,
    }
    return JobConfig.model_validate(
        {
            "name": "lora-run",
            "run_dir": str(run_dir),
            "model": {"base": "tiny-llama"},
            "data": {"train_files": ["chat.jsonl"]},
            "training": t,
            "cluster": {"num_workers": 2},
        }
    )


def _rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(rows) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _assert_same(got: dict[int, float], ref: dict[int, float], steps) -> None:
    for s in steps:
        assert math.isclose(got[s], ref[s], rel_tol=REL_TOL), (s, got[s], ref[s])


@pytest.fixture(scope="module")
def reference(ray_local, tiny_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    # 128 conversations pack into ~24 rows per worker: 6 steps of 2 stay inside the first epoch.
    write_sft(run_dir, tiny_model, n_train=128, n_val=8)
    art = train(_config(run_dir, tracking={"backends": ["tensorboard"]}))
    return run_dir, art


def test_fresh_run_artifacts(reference, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, art = reference
    rows = _rows(run_dir)
    losses = _losses(rows)
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert sorted(evals) == [3, 6]
    assert losses[STEPS] < losses[1] and evals[6] < evals[3]

    # Plain PEFT, no rayft: the adapter names a loadable base.
    adapter = run_dir / "adapter"
    assert art.output_dir == adapter
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_path == tiny_model
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # trained (PEFT inits B to zero)
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]])}
    assert model(**batch).logits.shape[-1] == model.config.vocab_size
    assert not (adapter / "optimizer.pt").exists()

    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["steps"] == STEPS and summary["tokens"] > 0 and summary["tokens_per_s"] > 0
    assert summary["final_loss"] == losses[STEPS] and summary["final_eval_loss"] == evals[6]
    assert len(summary["workers"]) == 2
    # planned vs measured: a worker's peak resident set holds torch itself (> 300 MB)
    assert all(w["peak_memory_gib"] > 0.3 for w in summary["workers"])
    plan = summary["plan"]
    assert plan["device"] == "cpu" and 0 < plan["planned_gib"] < 1
    peak = max(w["peak_memory_gib"] for w in summary["workers"])
    assert plan["measured_peak_gib"] == peak
    assert plan["measured_over_planned"] == round(peak / plan["planned_gib"], 3)

    card = (adapter / "README.md").read_text()
    manifest = json.loads((run_dir / "run.json").read_text())
    stage = manifest["stages"]["train"]
    assert stage["data_hash"] in card and stage["config_hash"] in card and "tiny-llama" in card
    assert stage["metrics"]["steps"] == STEPS

    # The tracker wrote rank 0's scalars into the run dir, not the worker's scratch dir.
    events = list((run_dir / "tracking" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    # keep_checkpoints=1: only the best by eval loss (here also the latest) survives.
    ckpts = sorted(p.name for p in (run_dir / "checkpoints" / "lora-run").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-000006"]


def test_sigkilled_worker_restarts_from_last_checkpoint(
    reference, tmp_path, monkeypatch, tiny_model
):
    """max_failures=1: rank 1 is SIGKILLed at step 5; Ray Train restarts the workers from the
    step-3 checkpoint and the run ends with the uninterrupted run's losses."""
    ref_losses = _losses(_rows(reference[0]))
    write_sft(tmp_path, tiny_model, n_train=128, n_val=8)
    fault = {"sigkill": {"step": 5, "rank": 1, "marker": str(tmp_path / "killed")}}
    monkeypatch.setenv("RAYFT_TRAIN_FAULT", json.dumps(fault))
    cfg = _config(tmp_path)
    cfg.cluster.max_failures = 1
    art = train(cfg)

    assert (tmp_path / "killed").exists()
    # from the step-3 checkpoint: a restart from step 0 would log these losses too
    assert [(r["step"], r["resumed_from"]) for r in _rows(tmp_path) if "resumed_from" in r] == [
        (4, 3)
    ]
    losses = _losses(_rows(tmp_path))
    _assert_same(losses, ref_losses, range(1, STEPS + 1))
    assert art.summary["final_loss"] == pytest.approx(ref_losses[STEPS], rel=REL_TOL)


def test_crash_during_checkpoint_upload_then_resume_replays_exactly(
    reference, tmp_path, monkeypatch, tiny_model
):
    """Rank 1 dies half-way through uploading checkpoint 6. Ray Train never registers it, so
    --resume starts from checkpoint 3, mid-epoch, replays steps 4..6 exactly and, with a higher
    max_steps, goes on to step 8."""
    ref_losses = _losses(_rows(reference[0]))
    write_sft(tmp_path, tiny_model, n_train=128, n_val=8)
    storage = tmp_path / "checkpoints" / "lora-run"
    fault = {
        "crash_in_upload": {
            "step": 6,
            "rank": 1,
            "marker": str(tmp_path / "crashed"),
            "dest": str(storage),
        }
    }
    monkeypatch.setenv("RAYFT_TRAIN_FAULT", json.dumps(fault))
    with pytest.raises(TrainingFailedError, match="--resume"):
        train(_config(tmp_path))
    monkeypatch.delenv("RAYFT_TRAIN_FAULT")

    # A file of rank 1 in the unregistered checkpoint is torn: resuming from it would fail.
    half, whole = storage / "checkpoint-000006", storage / "checkpoint-000003"
    sizes = {p.name: p.stat().st_size for p in whole.iterdir()}
    assert any(p.stat().st_size < sizes[p.name] for p in half.iterdir())
    snapshot = (storage / "checkpoint_manager_snapshot.json").read_text()
    assert "checkpoint-000003" in snapshot and "checkpoint-000006" not in snapshot
    # --resume may raise max_steps: steps 4..6 replay the reference, 7..8 are new. The rows the
    # crashed run wrote for steps 4..6 are replaced: every step appears once.
    art = train(_config(tmp_path, max_steps=8), resume=True)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert [(r["step"], r["resumed_from"]) for r in rows if "resumed_from" in r] == [(4, 3)]
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6, 8]
    resumed = _losses(rows)
    _assert_same(resumed, ref_losses, range(1, STEPS + 1))
    assert art.summary["steps"] == 8 and resumed[8] < resumed[4]
