"""`rayft quickstart` end to end: configs/quickstart.yaml with tiny-llama and tiny settings.

Prepare, train (2 Ray Train workers) and eval all run for real on the demo data; a second call
without --resume refuses to clobber the run, and --resume redoes only what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayft import cli

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _stages(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())["stages"]


def test_quickstart_runs_the_loop_and_resumes(tmp_path, tiny_model, ray_local, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the config's paths (examples/data/...) are relative to the checkout
    run_dir = tmp_path / "qs"
    overrides = [
        "model.base=tiny-llama",
        f"run_dir={run_dir}",
        "data.max_seq_len=256",
        "training.max_steps=4",
        "training.save_steps=2",
        "training.eval_steps=2",
        "eval.max_examples=6",
        "eval.max_new_tokens=8",
        "eval.bootstrap_samples=200",
    ]
    args = ["quickstart", *(x for o in overrides for x in ("--set", o))]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    html = run_dir / "eval" / "report.html"
    assert f"report: {html}" in out.replace("\n", "")
    assert "adapter vs base on check:valid_json" in out
    stages = _stages(run_dir)
    assert {"prepare", "train", "eval"} <= set(stages)
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["n_examples"] == 6
    assert "check:valid_json" in report["comparisons"]["adapter"]
    assert "data:image/png;base64," in html.read_text()  # loss curves from the real metrics.jsonl

    # Running again without --resume must not overwrite (or half-continue) the finished run.
    assert cli.main(args) == 2
    assert "--resume" in capsys.readouterr().err

    # An eval that never finished: --resume skips prepare and train and redoes only eval.
    (run_dir / "eval" / "report.html").unlink()
    assert cli.main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "prepare: already complete, skipped" in out and "train: already complete" in out
    again = _stages(run_dir)
    assert again["prepare"] == stages["prepare"] and again["train"] == stages["train"]
    assert again["eval"]["finished_at"] >= stages["eval"]["finished_at"] and html.exists()
