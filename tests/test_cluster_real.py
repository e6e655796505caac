"""An existing Ray cluster, started the way users start one: `ray start --head` and `ray start
--address` for a second node, separate processes, token authentication on, a private temp dir.
On it: `cluster status`, the pre-flight refusing a CPU-starved training run and a node with
another peft, `rayft submit` prepare -> train (a worker on each node) -> eval -> merge with the
run dir on storage both nodes share, and
`rayft jobs list/logs/stop/fetch`.

Each node runs in a session of its own (own ports; the head's --temp-dir); teardown ends those
sessions' processes only, never other Rays on the machine (no `ray stop`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from train_data import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOKEN = "rayft-test-token-6f1c0d2a9e8b47c5"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER", "RAY_JOB"))
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` is this venv's
    env.update(extra)
    return env


def _ray_start(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """`ray start --block ARGS` in a session of its own, with its agents on free ports."""
    ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port", "--metrics-export-port"]  # fmt: skip
    cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
           *args, *(f"{p}={free_port()}" for p in ports), "--disable-usage-stats"]  # fmt: skip
    environ = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN,
                         RAY_USAGE_STATS_ENABLED="0", **env)  # fmt: skip
    with log.open("w") as out:
        return subprocess.Popen(cmd, env=environ, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=log.parent)  # fmt: skip


def _end_session(proc: subprocess.Popen) -> None:
    """SIGTERM lets `ray start --block` stop its own processes; anything of that session still
    alive after that is killed."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    for other in psutil.process_iter():
        try:
            if os.getsid(other.pid) == proc.pid:
                other.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


def _get(url: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


def _alive(dashboard: str) -> int:
    nodes = _get(f"{dashboard}/api/v0/nodes?limit=100")["data"]["result"]["result"]
    return sum(1 for n in nodes if n["state"] == "ALIVE")


def _wait(what: str, ready, logs: list[Path], timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if ready():
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError, KeyError):
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{what}: " + "\n".join(p.read_text()[-3000:] for p in logs))
        time.sleep(1)


def start_head(temp: Path, cpus: int) -> tuple[subprocess.Popen, int, str]:
    """`ray start --head` with its dashboard in `temp` (token auth on): (process, GCS port,
    dashboard URL), once the dashboard answers."""
    gcs, dash = free_port(), free_port()
    head = _ray_start(
        ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={free_port()}", f"--num-cpus={cpus}", f"--temp-dir={temp}"],
        temp / "head.log",
    )  # fmt: skip
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait("the head did not come up", lambda: _get(f"{url}/api/jobs/") is not None,
              [temp / "head.log"])  # fmt: skip
    except BaseException:
        _end_session(head)
        raise
    return head, gcs, url


@pytest.fixture(scope="module")
def cluster():
    """A head of 2 CPUs and a node of 1 CPU, token auth on, in a private temp dir."""
    temp = Path(tempfile.mkdtemp(prefix="rft", dir="/tmp"))  # short: socket paths are limited
    head, gcs, url = start_head(temp, cpus=2)
    started = [head]
    try:
        node = _ray_start([f"--address=127.0.0.1:{gcs}", "--num-cpus=1"], temp / "node.log")
        started.append(node)
        _wait("the second node did not join", lambda: _alive(url) == 2, [temp / "node.log"])
        yield {"dashboard": url, "gcs": f"127.0.0.1:{gcs}", "temp": temp}
    finally:
        for proc in reversed(started):
            _end_session(proc)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model) -> Path:
    """A project dir with 24 support chats and a job file whose run dir is an absolute path on
    storage both nodes (one machine) and this client share."""
    root = tmp_path_factory.mktemp("project")
    rows = (ROOT / "examples/data/support.jsonl").read_text().splitlines()[:24]
    (root / "data").mkdir()
    (root / "data" / "support.jsonl").write_text("\n".join(rows) + "\n")
    run_dir = tmp_path_factory.mktemp("shared") / "run"
    (root / "job.yaml").write_text(
        f"name: submitted\nrun_dir: {run_dir}\nmodel: {{base: {tiny_model}}}\n"
        "data:\n  train_files: [data/support.jsonl]\n  max_seq_len: 256\n"
        "  dedupe: {near: false}\n"
        "training: {max_steps: 2, per_device_batch_size: 2, learning_rate: 0.01}\n"
        "cluster: {num_workers: 1}\n"
    )
    return root


def _rayft(*args: str, cwd: Path = ROOT, timeout: int = 180, **env: str):
    return subprocess.run(
        [str(BIN / "rayft"), *args],
        cwd=cwd,
        env=_clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _jsc(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster["dashboard"], headers={"Authorization": f"Bearer {TOKEN}"})


def test_missing_or_wrong_token_is_refused(cluster, tmp_path: Path) -> None:
    addr = cluster["dashboard"]
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
    sub = _rayft("submit", str(cfg), "--address", addr, "--set", "run_dir=/tmp/x", "--",
                 "prepare", RAY_AUTH_TOKEN_PATH=str(token_file))  # fmt: skip
    assert sub.returncode == 2 and "rejected the token" in sub.stderr

    token_file.write_text(TOKEN + "\n")  # the right token from a file works
    ok = _rayft("jobs", "list", "--address", addr, RAY_AUTH_TOKEN_PATH=str(token_file))
    assert ok.returncode == 0, ok.stderr


def test_status_shows_free_resources_per_node_and_running_jobs(cluster) -> None:
    from ray.job_submission import JobStatus

    addr, jsc = cluster["dashboard"], _jsc(cluster)
    busy = (
        "python -c \"print('[rayft train] step 3/40', flush=True); import time; time.sleep(300)\""
    )
    job_id = jsc.submit_job(
        entrypoint=busy,
        entrypoint_num_cpus=1,  # holds a CPU, as a stage's worker would
        metadata={"rayft": "1", "stage": "train", "config": "configs/demo.yaml"},
    )
    other = jsc.submit_job(entrypoint="python -c 'import time; time.sleep(300)'")
    try:
        _wait("the job did not start", lambda: "step 3/40" in jsc.get_job_logs(job_id), [])
        # Through the GCS, as a driver: free resources exactly, jobs via the dashboard.
        shown = _rayft("cluster", "status", "--address", cluster["gcs"],
                       RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        out = shown.stdout
        assert "nodes: 2" in out and "free/total: 2/3 CPU, 0/0 GPU" in out
        assert out.count("  node ") == 2 and "(head)" in out  # per node
        assert "rayft jobs running: 1" in out  # the unmarked job is not rayft's
        assert f"{job_id}  RUNNING   train     configs/demo.yaml  step 3/40" in out

        # Through the dashboard, no driver: the autoscaler's report of free resources lags.
        def held() -> bool:
            seen = _rayft("cluster", "status", "--address", addr, RAY_AUTH_TOKEN=TOKEN)
            return seen.returncode == 0 and "free/total: 2/3 CPU" in seen.stdout

        _wait("the dashboard never showed the held CPU", held, [], timeout=60)

        stopped = _rayft("jobs", "stop", job_id, "--address", addr, RAY_AUTH_TOKEN=TOKEN)
        assert stopped.returncode == 0 and "stop requested" in stopped.stdout
        _wait("the job did not stop", lambda: jsc.get_job_status(job_id).is_terminal(), [], 60)
        assert jsc.get_job_status(job_id) == JobStatus.STOPPED

        unknown = _rayft("jobs", "logs", "raysubmit_nope", "--address", addr,
                         RAY_AUTH_TOKEN=TOKEN)  # fmt: skip
        assert unknown.returncode == 2 and "refused" in unknown.stderr
    finally:
        jsc.stop_job(other)
        jsc.stop_job(job_id)


def test_starved_training_is_refused_before_anything_is_submitted(cluster, project) -> None:
    """3 workers of 1 CPU fit the 2 + 1 CPUs exactly and leave none for the Ray Data tasks that
    feed them: the run would hang without a step. Refused by `rayft submit` (through the
    dashboard) and by `rayft train --address` (a driver on the GCS)."""
    addr = cluster["dashboard"]

    def counts() -> tuple[int, int]:
        jobs = _jsc(cluster).list_jobs()
        return len(jobs), sum(1 for j in jobs if (j.metadata or {}).get("rayft") == "1")

    before = counts()
    sub = _rayft("submit", "job.yaml", "--address", addr, "--set", "cluster.num_workers=3",
                 "--", "train", cwd=project, RAY_AUTH_TOKEN=TOKEN)  # fmt: skip
    assert sub.returncode == 2, sub.stdout + sub.stderr
    why = "train needs 4 CPUs (3 training workers x 1 + 1 for the Ray Data tasks that feed them)"
    assert why in sub.stderr and "would wait for one forever" in sub.stderr
    assert "Fix: --set cluster.num_workers=2" in sub.stderr and "Traceback" not in sub.stderr
    assert "submitted" not in sub.stdout
    assert counts() == (before[0] + 1, before[1])  # the pre-flight's own job, not the stage

    train = _rayft("train", "job.yaml", "--address", cluster["gcs"], "--set",
                   "cluster.num_workers=3", cwd=project,
                   RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)  # fmt: skip
    assert train.returncode == 2 and why in train.stderr, train.stdout + train.stderr
    assert "[rayft train]" not in train.stdout  # refused before the stage started

    relative = _rayft("submit", "job.yaml", "--address", addr, "--set", "run_dir=runs/x",
                      "--", "prepare", cwd=project, RAY_AUTH_TOKEN=TOKEN)  # fmt: skip
    assert relative.returncode == 2 and "run_dir=runs/x is relative" in relative.stderr


def test_submit_prepare_then_train_on_shared_storage_and_fetch(cluster, project, tmp_path):
    addr, env = cluster["dashboard"], {"RAY_AUTH_TOKEN": TOKEN}
    run_dir = Path(_run_dir(project))
    ids = {}
    # Train on both nodes: two workers of one CPU spread over the 2 + 1 CPUs, the head's other
    # CPU left to the Ray Data tasks that feed them (the pre-flight checks exactly this).
    spread = ["--set", "cluster.num_workers=2", "--set", "cluster.placement_strategy=SPREAD"]
    for stage in ("prepare", "train", "eval", "merge"):
        sets = spread if stage == "train" else []
        done = _rayft("submit", "job.yaml", "--address", addr, *sets, "--", stage, cwd=project,
                      timeout=600, **env)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "[rayft preflight] node " in done.stdout and "(head)" in done.stdout
        assert ": SUCCEEDED" in done.stdout
        assert f"outputs: {run_dir} (this machine sees them)" in done.stdout
        ids[stage] = done.stdout.split("submitted ")[1].split(":")[0]
    assert json.loads((run_dir / "data" / "data_report.json").read_text())["rows_in"] == 24
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["num_workers"] == 2
    assert len({w["node_id"] for w in summary["workers"]}) == 2  # one worker on each node
    assert "adapter" in json.loads((run_dir / "eval" / "report.json").read_text())["arms"]
    assert (run_dir / "merged" / "config.json").is_file()

    listed = _rayft("jobs", "list", "--address", addr, **env)
    assert listed.returncode == 0, listed.stderr
    assert f"{ids['prepare']}  SUCCEEDED  prepare   job.yaml" in listed.stdout
    assert f"{ids['train']}  SUCCEEDED  train     job.yaml" in listed.stdout
    assert "survey" not in listed.stdout  # the pre-flight's jobs are not listed

    logs = _rayft("jobs", "logs", ids["train"], "--address", addr, **env)
    assert logs.returncode == 0 and "[rayft train] done: 2 steps" in logs.stdout

    # The run dir read on the cluster, carried here through the dashboard.
    out = tmp_path / "fetched"
    got = _rayft("jobs", "fetch", ids["train"], "--address", addr, "--out", str(out), **env)
    assert got.returncode == 0, got.stdout + got.stderr
    for rel in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                "train_summary.json", "run.json", "data/data_report.json"):  # fmt: skip
        assert (out / rel).read_bytes() == (run_dir / rel).read_bytes(), rel
    assert not (out / "checkpoints").exists() and not (out / "data" / "train").exists()


def _run_dir(project: Path) -> str:
    import yaml

    return yaml.safe_load((project / "job.yaml").read_text())["run_dir"]


def test_a_node_with_another_peft_is_refused_by_name(cluster, project, tmp_path) -> None:
    """A third node whose PYTHONPATH holds a stray peft 0.0.1 ahead of the installed one."""
    fake = tmp_path / "site"
    (fake / "peft").mkdir(parents=True)
    (fake / "peft" / "__init__.py").write_text('__version__ = "0.0.1"\n')
    log = cluster["temp"] / "stray.log"
    node = _ray_start([f"--address={cluster['gcs']}", "--num-cpus=1"], log, PYTHONPATH=str(fake))
    try:
        _wait("the third node did not join", lambda: _alive(cluster["dashboard"]) == 3, [log])
        check = _rayft("cluster", "check", "job.yaml", "--address", cluster["dashboard"],
                       "--stage", "train", cwd=project, RAY_AUTH_TOKEN=TOKEN)  # fmt: skip
        assert check.returncode == 2, check.stdout + check.stderr
        assert "peft 0.0.1, outside rayft's peft" in check.stderr
        assert f"(imported from {fake / 'peft'})" in check.stderr
        assert check.stderr.count("\n  - ") == 1  # the head and the other node are fine
        assert check.stdout.count("[rayft preflight] node ") == 3
    finally:
        _end_session(node)
    _wait("the third node did not leave", lambda: _alive(cluster["dashboard"]) == 2, [log], 120)
