"""Keep the N best checkpoints by validation loss, through a real Ray Train run.

The TRL runs elsewhere lose less at every evaluation, so there the best checkpoint is also the
latest and "keep the best" cannot be told apart from "keep the latest". Here a one-worker
TorchTrainer drives rayft's own reporting callback (`RayReport`, as HF's Trainer would call it)
with evaluation losses that go down and up again, under the `CheckpointConfig` that `rayft train`
builds, with `MetricsFile` writing metrics.jsonl in the controller. The worker is alone, so it
also drops Ray Train's process group first, as `rayft train` does for a world of one (no DDP).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

EVAL_LOSSES = [3.0, 1.0, 2.0, 4.0]  # best: steps 2 and 3; the latest (4) is the worst


@pytest.mark.slow
def test_keeps_the_best_checkpoints_by_eval_loss_not_the_latest(ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayft.training.driver import checkpoint_config
    from rayft.training.report import MetricsFile

    # Defined in the test so that Ray pickles it by value (workers cannot import tests/).
    def _loop(config):
        import torch.distributed as dist
        from transformers import TrainingArguments
        from transformers.training_args import ParallelMode

        from rayft.training.report import RayReport
        from rayft.training.worker import _alone_without_ddp

        # A world of one trains without DDP; Ray Train's reports work without the group.
        assert dist.is_initialized()
        _alone_without_ddp()
        assert not dist.is_initialized()
        hf = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none")
        assert hf.parallel_mode == ParallelMode.NOT_PARALLEL and hf.world_size == 1

        callback = RayReport(max_steps=len(config["eval_losses"]))
        args = SimpleNamespace(output_dir=tempfile.mkdtemp(prefix="rayft-ckpt-test-"))
        state = None
        for step, eval_loss in enumerate(config["eval_losses"], 1):
            state = SimpleNamespace(global_step=step, num_input_tokens_seen=100 * step)
            callback.on_log(args, state, None, logs={"loss": 5.0 - step, "learning_rate": 1e-3})
            callback.on_log(args, state, None, logs={"eval_loss": eval_loss})
            local = Path(args.output_dir) / f"checkpoint-{step}"  # where HF's Trainer saves
            local.mkdir()
            (local / "step.txt").write_text(str(step))
            callback.on_save(args, state, None)
        callback.on_train_end(args, state, None)

    result = TorchTrainer(
        _loop,
        train_loop_config={"eval_losses": EVAL_LOSSES},
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(
            name="keep",
            storage_path=str(tmp_path / "storage"),
            checkpoint_config=checkpoint_config(keep=2, has_validation=True),
            callbacks=[MetricsFile(str(tmp_path), len(EVAL_LOSSES))],
        ),
    ).fit()

    # The two best (steps 2 and 3) and the latest (4, what a restore or --resume continues
    # from, which Ray Train never deletes); step 1 is gone.
    kept = sorted(p.name for p in (tmp_path / "storage" / "keep").glob("checkpoint-*"))
    assert kept == ["checkpoint-000002", "checkpoint-000003", "checkpoint-000004"]
    reported = sorted(
        (json.loads((Path(c.path) / "step.txt").read_text()), m["step"], m["eval_loss"])
        for c, m in result.best_checkpoints
    )
    assert reported == [(2, 2, 1.0), (3, 3, 2.0)]

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    evals = [
        (r["step"], r["eval_loss"], round(r["eval_perplexity"], 4))
        for r in rows
        if "eval_loss" in r
    ]
    assert evals == [(1, 3.0, 20.0855), (2, 1.0, 2.7183), (3, 2.0, 7.3891), (4, 4.0, 54.5982)]
    assert [r["tokens"] for r in rows if "loss" in r] == [100, 200, 300, 400]
