"""Ray Jobs submission and cluster status, against a real Ray head with token authentication.

The head runs in its own session (own ports, own --temp-dir) so other Ray instances on the
machine are untouched; teardown ends that session's processes only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from rayft.cluster import status, submission
from rayft.errors import RayftError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOKEN = "rayft-test-token-6f1c0d2a9e8b47c5"


# --------------------------------------------------------------------------- no cluster


def test_submission_carries_project_config_and_marks_job(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    cfg = tmp_path / "configs" / "job.yaml"
    cfg.write_text("name: demo\n")
    spec = submission(
        cfg, ["--", "prepare", "--limit", "3"], overrides=["training.max_steps=1"], project=tmp_path
    )
    assert spec["entrypoint"] == (
        "python -m rayft.cli prepare configs/job.yaml --limit 3 --set=training.max_steps=1"
    )
    env = spec["runtime_env"]
    assert env["working_dir"] == str(tmp_path)
    assert Path(env["py_modules"][0]).joinpath("cli.py").is_file()
    assert {".git/", ".venv/", "runs/"} <= set(env["excludes"])
    assert spec["metadata"] == {"rayft": "1", "stage": "prepare", "config": "configs/job.yaml"}

    # Subcommands of two words keep the config after both.
    spec = submission(cfg, ["--", "ab", "report", "--json"], project=tmp_path)
    assert spec["entrypoint"] == "python -m rayft.cli ab report configs/job.yaml --json"
    assert spec["metadata"]["stage"] == "ab report"


def test_submission_from_this_checkout_uploads_the_package_once() -> None:
    spec = submission(ROOT / "configs" / "quickstart.yaml", ["train"], project=ROOT)
    assert "/rayft/" in spec["runtime_env"]["excludes"]
    assert spec["entrypoint"].endswith("train configs/quickstart.yaml")


def test_submission_rejects_missing_stage_file_and_outside_config(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text("name: demo\n")
    with pytest.raises(RayftError, match="no stage"):
        submission(cfg, ["--"], project=tmp_path)
    with pytest.raises(RayftError, match="not found"):
        submission(tmp_path / "missing.yaml", ["prepare"], project=tmp_path)
    with pytest.raises(RayftError, match="outside the project"):
        submission(cfg, ["prepare"], project=tmp_path / "elsewhere")


def test_status_reports_local_cluster(ray_local, capsys) -> None:
    info = status()
    assert info["nodes"] >= 1
    assert info["cpus"][0] == 4
    assert info["gpus"][0] == 0
    assert info["jobs"] == []  # the embedded Ray has no dashboard, hence no jobs
    assert "CPUs:" in capsys.readouterr().out


# --------------------------------------------------------------------------- a real head


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER"))
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` is this venv's
    env.update(extra)
    return env


def _end_session(head: subprocess.Popen) -> None:
    """Stop the head: SIGTERM lets `ray start --block` stop its own processes; anything of
    that session still alive after that is killed."""
    pid = head.pid
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=8)
    except subprocess.TimeoutExpired:
        head.kill()
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == pid:
                proc.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on loopback with RAY_AUTH_MODE=token, 2 CPUs, its own ports and temp dir."""
    gcs, dash = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="rft", dir="/tmp")  # short: Ray's socket paths are limited
    ports = {
        "--ray-client-server-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
    }
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        *(f"{k}={v}" for k, v in ports.items()),
        "--num-cpus=2",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, RAY_USAGE_STATS_ENABLED="0")
    log = open(Path(temp) / "head.log", "w")  # noqa: SIM115 (closed in teardown)
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=temp
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            req = urllib.request.Request(
                f"{url}/api/jobs/", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    json.load(r)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                if proc.poll() is not None or time.time() > deadline:
                    log.flush()
                    raise RuntimeError(
                        f"Ray head did not come up: {(Path(temp) / 'head.log').read_text()}"
                    ) from None
                time.sleep(0.5)
        yield {"dashboard": url, "gcs": f"127.0.0.1:{gcs}"}
    finally:
        _end_session(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _rayft(*args: str, cwd: Path = ROOT, timeout: int = 120, **env: str):
    return subprocess.run(
        [str(BIN / "rayft"), *args],
        cwd=cwd,
        env=_clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_submit_runs_a_stage_with_the_token_and_follows_its_logs(
    ray_head, tiny_model, tmp_path: Path
) -> None:
    """`rayft prepare` as a Ray Job: the project travels in the runtime_env, the job's own
    driver connects to the token-protected cluster, and its logs stream back."""
    rows = (ROOT / "examples/data/support.jsonl").read_text().splitlines()[:24]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "support.jsonl").write_text("\n".join(rows) + "\n")
    run_dir = tmp_path / "out" / "run"
    (tmp_path / "job.yaml").write_text(
        f"name: submitted\nrun_dir: {run_dir}\nmodel: {{base: {tiny_model}}}\n"
        "data:\n  train_files: [data/support.jsonl]\n  max_seq_len: 256\n"
        "  dedupe: {near: false}\ncluster: {num_workers: 1}\n"
    )
    addr = ray_head["dashboard"]
    done = _rayft("submit", "job.yaml", "--address", addr, "--", "prepare", cwd=tmp_path,
                  RAY_AUTH_TOKEN=TOKEN)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "submitted raysubmit_" in done.stdout
    assert ": SUCCEEDED" in done.stdout
    assert "prepare" in done.stdout.lower()  # the stage's own log lines came back
    report = json.loads((run_dir / "data" / "data_report.json").read_text())
    assert report["rows_in"] == 24

    listed = _rayft("jobs", "list", "--address", addr, RAY_AUTH_TOKEN=TOKEN)
    assert listed.returncode == 0, listed.stderr
    job_id = done.stdout.split("submitted ")[1].split(":")[0]
    assert f"{job_id}  SUCCEEDED  prepare   job.yaml" in listed.stdout

    logs = _rayft("jobs", "logs", job_id, "--address", addr, RAY_AUTH_TOKEN=TOKEN)
    assert logs.returncode == 0, logs.stderr
    assert "Running entrypoint" in logs.stdout and "prepare" in logs.stdout


def test_missing_or_wrong_token_is_refused(ray_head, tmp_path: Path) -> None:
    addr = ray_head["dashboard"]
    missing = _rayft("jobs", "list", "--address", addr)
    assert missing.returncode == 2
    assert "needs a token and none was given" in missing.stderr
    assert "RAY_AUTH_TOKEN" in missing.stderr and "Traceback" not in missing.stderr

    wrong = _rayft("jobs", "list", "--address", addr, RAY_AUTH_TOKEN="not-the-token")
    assert wrong.returncode == 2
    assert "rejected the token" in wrong.stderr

    token_file = tmp_path / "token"
    token_file.write_text("also-wrong\n")
    cfg = ROOT / "configs" / "quickstart.yaml"
    sub = _rayft("submit", str(cfg), "--address", addr, "--", "prepare",
                 RAY_AUTH_TOKEN_PATH=str(token_file))  # fmt: skip
    assert sub.returncode == 2 and "rejected the token" in sub.stderr

    token_file.write_text(TOKEN + "\n")  # the right token from a file works
    ok = _rayft("jobs", "list", "--address", addr, RAY_AUTH_TOKEN_PATH=str(token_file))
    assert ok.returncode == 0, ok.stderr


def test_status_shows_running_jobs_and_stop_stops_them(ray_head) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    addr = ray_head["dashboard"]
    jsc = JobSubmissionClient(addr, headers={"Authorization": f"Bearer {TOKEN}"})
    job_id = jsc.submit_job(
        entrypoint="python -c 'import time; time.sleep(120)'",
        metadata={"rayft": "1", "stage": "train", "config": "configs/demo.yaml"},
    )
    other = jsc.submit_job(entrypoint="python -c 'import time; time.sleep(120)'")
    try:
        deadline = time.time() + 60
        while jsc.get_job_status(job_id) != JobStatus.RUNNING and time.time() < deadline:
            time.sleep(0.5)

        shown = _rayft("cluster", "status", "--address", addr, RAY_AUTH_TOKEN=TOKEN)
        assert shown.returncode == 0, shown.stderr
        assert "nodes: 1" in shown.stdout
        assert "CPUs:  2 total" in shown.stdout
        assert "rayft jobs running: 1" in shown.stdout  # the unmarked job is not rayft's
        assert f"{job_id}  RUNNING   train     configs/demo.yaml" in shown.stdout

        # Through the GCS, as a driver: available resources too, jobs via the dashboard.
        gcs = _rayft("cluster", "status", "--address", ray_head["gcs"],
                     RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)  # fmt: skip
        assert gcs.returncode == 0, gcs.stderr
        assert "available / 2 total" in gcs.stdout
        assert "rayft jobs running: 1" in gcs.stdout

        stopped = _rayft("jobs", "stop", job_id, "--address", addr, RAY_AUTH_TOKEN=TOKEN)
        assert stopped.returncode == 0 and "stop requested" in stopped.stdout
        deadline = time.time() + 30
        while not jsc.get_job_status(job_id).is_terminal() and time.time() < deadline:
            time.sleep(0.5)
        assert jsc.get_job_status(job_id) == JobStatus.STOPPED

        unknown = _rayft("jobs", "logs", "raysubmit_nope", "--address", addr,
                         RAY_AUTH_TOKEN=TOKEN)  # fmt: skip
        assert unknown.returncode == 2 and "refused" in unknown.stderr
    finally:
        jsc.stop_job(other)
        jsc.stop_job(job_id)
