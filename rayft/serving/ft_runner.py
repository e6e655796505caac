"""What a fine-tuning job runs on the cluster, as a Ray job: `python -m rayft.serving.ft_runner
<job dir>`. The same stages as the CLI (`rayft prepare`, then `rayft train`) on the job file
derived from the server's job file and the request (`job_file`, written to
`<job dir>/job.yaml` by the service).

Two things it adds, both read by the service: `n_epochs` becomes `training.max_steps` once
prepare has counted the training sequences, and a failure is written to `<job dir>/error.json`
in OpenAI's error shape (a bad row names the file by its id, the line and the field).
"""

from __future__ import annotations

import json
import math
import sys
import traceback
from pathlib import Path
from typing import Any

from rayft.config import JobConfig, load_config
from rayft.errors import RayftError
from rayft.serving.errors import BadRequest
from rayft.serving.ft_files import row_error

OBJECTIVE = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo"}


def job_file(
    job: JobConfig, job_id: str, run_dir: Path, files: dict[str, dict], hyper: dict[str, Any],
    kind: str, seed: int, address: str | None = None, grader: dict | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The job file of one fine-tuning job: the server's own job file (model, data rules,
    training defaults, cluster) with the request's files and hyperparameters. Nothing else of
    the request reaches it: no paths, no config keys. `address`: the serving cluster's GCS,
    which the job's stages connect to by name; `grader`: a reinforcement job's (checked, never
    a python one)."""
    cfg = job.model_dump(mode="json", exclude={"serve", "eval", "export"})
    cfg["name"], cfg["run_dir"] = job_id, str(run_dir)
    d = cfg["data"]
    d["train_files"] = [files["training_file"]["path"]]
    d["validation_files"] = [files["validation_file"]["path"]] if "validation_file" in files else []
    d["test_files"] = []
    d["split"] = {**d["split"], "validation": 0.0, "test": 0.0}  # OpenAI trains on every row
    d["on_error"] = "fail"  # a bad row fails the job (its first bad line is the job's error)
    d["format"] = "auto"
    t = cfg["training"]
    t["seed"] = seed
    t["objective"] = OBJECTIVE[kind]
    if kind == "reinforcement":
        d["format"] = "reinforcement"  # OpenAI's RFT rows: messages without the answer + fields
        t["grader"] = grader
        if hyper.get("eval_interval", "auto") != "auto":
            if "validation_file" not in files:  # nothing to evaluate: refused, not dropped
                raise BadRequest(
                    "hyperparameters.eval_interval needs a validation_file to evaluate on",
                    "hyperparameters.eval_interval",
                    "invalid_value",
                )
            t["eval_steps"] = hyper["eval_interval"]
    if "validation_file" not in files:
        t["eval_steps"] = None
    if hyper["learning_rate_multiplier"] != "auto":
        t["learning_rate"] = t["learning_rate"] * hyper["learning_rate_multiplier"]
    if hyper.get("beta", "auto") != "auto":
        t["dpo_beta"] = hyper["beta"]
    if hyper["batch_size"] != "auto":  # examples per optimizer step, over every worker
        workers = cfg["cluster"]["num_workers"]
        if hyper["batch_size"] % workers:
            raise BadRequest(
                f"hyperparameters.batch_size={hyper['batch_size']} is not a multiple of the "
                f"server's {workers} training workers",
                "hyperparameters.batch_size",
                "invalid_value",
            )
        # GRPO's micro-batch holds completions: one prompt's group per worker per micro-step
        t["per_device_batch_size"] = t["grpo"]["num_generations"] if kind == "reinforcement" else 1
        t["gradient_accumulation_steps"] = hyper["batch_size"] // workers
    cfg["cluster"]["address"] = address
    return cfg


def steps_for(report: dict[str, Any], cfg: JobConfig, epochs: int, workers: int) -> int:
    """Optimizer steps for `epochs` passes over the training split prepare wrote."""
    t = cfg.training
    packing = report.get("packing") or {}
    sequences = (packing.get("sequences") or {}).get("train") or report["rows_out"]["train"]
    per_step = t.per_device_batch_size * t.gradient_accumulation_steps * workers
    if t.objective == "grpo":  # a step's completions are num_generations per prompt
        per_step = max(1, per_step // t.grpo.num_generations)
    return max(1, math.ceil(epochs * sequences / per_step))


def first_reject(data_dir: Path, files: dict[str, list[str]]) -> dict[str, str] | None:
    """The first bad row prepare found, as the job's error; `files`: path -> [param, file id]."""
    path = data_dir / "rejects.jsonl"
    if not path.exists():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        return None
    r = json.loads(lines[0])
    param, file_id = files.get(r["file"], ["training_file", r["file"]])
    more = f" ({len(lines) - 1} more bad rows)" if len(lines) > 1 else ""
    return row_error(param, file_id, r["line"], r["field"], r["reason"] + more)


def run(job_dir: Path) -> None:
    from rayft.data import prepare
    from rayft.training import train

    request = json.loads((job_dir / "request.json").read_text())
    cfg = load_config(job_dir / "job.yaml")
    try:
        artifacts = prepare(cfg)
    except RayftError as e:
        error = first_reject(cfg.run_path / "data", request["files"])
        raise JobError(error or {"code": "invalid_training_file", "message": str(e)}) from e
    epochs = request.get("n_epochs")
    if epochs is not None:
        steps = steps_for(artifacts.report, cfg, epochs, cfg.cluster.num_workers)
        cfg = load_config(job_dir / "job.yaml", [f"training.max_steps={steps}"])
        (job_dir / "steps.json").write_text(json.dumps({"max_steps": steps}))
    train(cfg)


class JobError(Exception):
    def __init__(self, error: dict[str, str]):
        super().__init__(error["message"])
        self.error = {"param": None, **error}


def main(argv: list[str]) -> int:
    job_dir = Path(argv[0])
    try:
        run(job_dir)
    except JobError as e:
        _write_error(job_dir, e.error)
        print(f"fine-tuning job failed: {e}", file=sys.stderr)
        return 1
    except RayftError as e:  # a refusal of train: the message says what to do
        _write_error(job_dir, {"code": "training_failed", "message": str(e)[:2000]})
        print(f"fine-tuning job failed: {e}", file=sys.stderr)
        return 1
    except BaseException as e:  # a crash: the job's log has the traceback
        traceback.print_exc()
        what = f"{type(e).__name__}: {e}"[:1000]
        _write_error(job_dir, {"code": "training_failed", "message": what})
        return 1
    return 0


def _write_error(job_dir: Path, error: dict[str, Any]) -> None:
    tmp = job_dir / "error.json.tmp"
    tmp.write_text(json.dumps({"param": None, **error}))
    tmp.replace(job_dir / "error.json")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
