"""Ray Jobs submission spec and cluster status against a real local Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from rayft.cluster import status, submission
from rayft.errors import RayftError


def test_submission_carries_config_and_marks_job(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text("name: demo\n")
    spec = submission(cfg, ["--", "prepare", "--limit", "3"], overrides=["train.epochs=1"])
    assert spec["entrypoint"] == (
        "python -m rayft.cli prepare job.yaml --limit 3 --set=train.epochs=1"
    )
    assert spec["runtime_env"]["working_dir"] == str(tmp_path)
    assert Path(spec["runtime_env"]["py_modules"][0]).joinpath("cli.py").is_file()
    assert spec["metadata"] == {"rayft": "1", "stage": "prepare", "config": "job.yaml"}


def test_submission_rejects_missing_stage_and_file(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text("name: demo\n")
    with pytest.raises(RayftError, match="no stage"):
        submission(cfg, ["--"])
    with pytest.raises(RayftError, match="not found"):
        submission(tmp_path / "missing.yaml", ["prepare"])


def test_status_reports_local_cluster(ray_local, capsys) -> None:
    info = status()
    assert info["nodes"] >= 1
    assert info["cpus"][0] == 4
    assert info["gpus"][0] == 0
    assert "CPUs:" in capsys.readouterr().out
