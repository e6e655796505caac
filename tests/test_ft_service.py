"""The fine-tuning service end to end: `rayft serve --address` on an existing Ray cluster (`ray
start --head`, with its dashboard: jobs are real Ray Jobs), driven by the official `openai`
client the way OpenAI's docs drive OpenAI. Uploads, a supervised job with `n_epochs` and
`suffix` whose `ft:` model then answers chat, a DPO job, a file with a bad line, cancel, two
tenants isolated both ways, and a restart of `rayft serve` in the middle of a job.

tiny-llama, 1 training worker; jobs run one at a time (serve.fine_tuning.max_running_jobs).
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from test_cluster_real import (
    BIN,
    ROOT,
    TOKEN,
    _clean_env,
    _end_session,
    _jsc,
    _wait,
    start_head,
)
from train_data import free_port

pytestmark = pytest.mark.slow

KEYS = {"acme": "sk-acme-7c1e", "globex": "sk-globex-93ab"}
ADMIN = "sk-admin-4d2f"
SUPPORT = (ROOT / "examples/data/support.jsonl").read_text().splitlines()[:24]


def _health(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
        return r.status == 200


@pytest.fixture(scope="module")
def cluster():
    """A head of 4 CPUs with its dashboard (Ray Jobs), token authentication on."""
    temp = Path(tempfile.mkdtemp(prefix="rft", dir="/tmp"))  # short: socket paths are limited
    head, gcs, url = start_head(temp, cpus=4)
    try:
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": url, "temp": temp}
    finally:
        _end_session(head)
        shutil.rmtree(temp, ignore_errors=True)


class Server:
    """`rayft serve JOB --address GCS` as its own process; `restart` stops it (SIGTERM, as a
    user's Ctrl-C) and starts it again on the same state."""

    def __init__(self, job: Path, gcs: str, port: int):
        self.job, self.gcs, self.url = job, gcs, f"http://127.0.0.1:{port}"
        self.log = job.parent / "serve.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        out = self.log.open("a")
        self.proc = subprocess.Popen(
            [str(BIN / "rayft"), "serve", str(self.job), "--address", self.gcs],
            cwd=self.job.parent, env=_clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN),
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        _wait("rayft serve did not come up", lambda: _health(self.url), [self.log], timeout=240)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)

    def client(self, tenant: str) -> openai.OpenAI:
        key = ADMIN if tenant == "admin" else KEYS[tenant]
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def server(cluster, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_service")
    port = free_port()
    (root / "job.yaml").write_text(
        f"name: service\nrun_dir: {root / 'run'}\nmodel: {{base: {tiny_model}}}\n"
        "data: {max_seq_len: 256, dedupe: {near: false}}\n"
        "training: {max_steps: 2, per_device_batch_size: 2, learning_rate: 0.01, save_steps: 2,"
        " keep_checkpoints: 2}\n"
        "cluster: {num_workers: 1}\n"
        f"serve:\n  port: {port}\n  admin_key: {ADMIN}\n  api_keys: {json.dumps(KEYS)}\n"
        "  cpus_per_replica: 0.5\n"
        "  fine_tuning: {enabled: true, max_running_jobs: 1, poll_s: 0.5, max_file_mb: 0.5}\n"
    )
    s = Server(root / "job.yaml", cluster["gcs"], port)
    s.dashboard, s.state = cluster["dashboard"], {}
    s.start()
    yield s
    s.stop()


def _upload(c: openai.OpenAI, lines: list[str], name: str = "train.jsonl"):
    data = ("\n".join(lines) + "\n").encode()
    return c.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune")


def _wait_job(c: openai.OpenAI, job_id: str, states: tuple[str, ...], timeout: float = 600):
    deadline = time.time() + timeout
    while True:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if job.status in states:
            return job
        assert time.time() < deadline, f"job {job_id} still {job.status}"
        time.sleep(1)


def _events(c: openai.OpenAI, job_id: str) -> list:
    return list(c.fine_tuning.jobs.list_events(job_id, limit=100))


def test_uploads_refused_with_reasons_and_nothing_stored(server):
    c = server.client("acme")
    cases = [
        (("../../etc/passwd", b'{"text": "x"}\n'), "fine-tune", "filename"),
        (("a.jsonl", b"x" * 600_000), "fine-tune", "limit"),
        (("a.jsonl", b'{"text": "ok"}\nnot json\n'), "fine-tune", "line 2"),
        (("a.jsonl", b'{"text": "caf\xe9"}\n'), "fine-tune", "UTF-8"),
        (("a.jsonl", b'{"text": "ok"}\n'), "assistants", "purpose"),
    ]
    for file, purpose, said in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.files.create(file=file, purpose=purpose)
        assert said in e.value.message, e.value.message
    # A chunked upload (no Content-Length) is cut at the limit, not spooled whole first; a form
    # field the server does not know is refused.
    import requests

    def chunked(extra: bytes = b""):
        yield (b'--b1\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
               + extra + b'--b1\r\nContent-Disposition: form-data; name="file"; '
               b'filename="big.jsonl"\r\n\r\n')  # fmt: skip
        for _ in range(1 if extra else 10):
            yield b'{"text": "' + b"x" * 100_000 + b'"}\n'
        yield b"\r\n--b1--\r\n"

    headers = {"Content-Type": "multipart/form-data; boundary=b1",
               "Authorization": f"Bearer {KEYS['acme']}"}  # fmt: skip
    expiry = b'--b1\r\nContent-Disposition: form-data; name="expires_after"\r\n\r\n3600\r\n'
    for extra, code in ((b"", "file_too_large"), (expiry, "unknown_parameter")):
        r = requests.post(
            f"{server.url}/v1/files", data=chunked(extra), headers=headers, timeout=60
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
    assert list(c.files.list()) == []


def test_supervised_job_to_a_served_model(server):
    c = server.client("acme")
    f = _upload(c, SUPPORT[:8])
    assert (f.object, f.purpose, f.filename, f.bytes) == ("file", "fine-tune", "train.jsonl",
                                                          len("\n".join(SUPPORT[:8])) + 1)  # fmt: skip
    assert c.files.content(f.id).text.splitlines() == SUPPORT[:8]
    base = c.models.list().data[0].id
    assert base == "tiny-llama"  # the base under its own name first
    job = c.fine_tuning.jobs.create(
        training_file=f.id, model=base, hyperparameters={"n_epochs": 2}, suffix="support", seed=7
    )
    assert job.status == "validating_files" and job.seed == 7
    job = _wait_job(c, job.id, ("succeeded", "failed"))
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny-llama:acme:support:{job.id}"
    assert job.hyperparameters.n_epochs == 2 and job.trained_tokens > 0 and job.finished_at
    events = _events(c, job.id)
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    metrics = [e for e in events if e.type == "metrics"]
    total = metrics[0].data["total_steps"]
    report = json.loads((Path(server.job.parent) / "run/fine_tuning/jobs" / job.id /
                         "run/data/data_report.json").read_text())  # fmt: skip
    # 2 epochs over the packed training sequences at 2 sequences a step
    assert total == -(-2 * report["packing"]["sequences"]["train"] // 2)
    job_file = (Path(server.job.parent) / "run/fine_tuning/jobs" / job.id / "job.yaml").read_text()
    port = server.gcs.rsplit(":", 1)[1]  # the GCS may name the node's own IP for 127.0.0.1
    assert f":{port}\n" in job_file.split("address: ", 1)[1]  # its stages attach to it by name
    assert sorted(steps) == list(range(1, total + 1))
    messages = [e.message for e in events]
    assert (
        "Fine-tuning job started" in messages and "The job has successfully completed" in messages
    )
    csv = c.files.content(job.result_files[0]).text.splitlines()
    assert csv[0].startswith("step,train_loss") and len(csv) == total + 1
    ckpts = list(c.fine_tuning.jobs.checkpoints.list(job.id))
    kept = [k.step_number for k in ckpts]  # training.keep_checkpoints: 2, newest first
    assert len(kept) == 2 and kept[0] > kept[1] and all(k % 2 == 0 for k in kept)
    assert all(k.metrics.train_loss is not None for k in ckpts)
    models = {m.id: m.owned_by for m in c.models.list()}
    assert models[job.fine_tuned_model] == "acme"
    hi = [{"role": "user", "content": "My order is late"}]
    for name in (job.fine_tuned_model, ckpts[-1].fine_tuned_model_checkpoint):
        r = c.chat.completions.create(model=name, messages=hi, max_tokens=4, temperature=0)
        assert r.choices[0].message.content is not None
    server.state = {"file": f.id, "job": job.id, "model": job.fine_tuned_model}


def test_tenants_are_isolated_both_ways(server):
    acme, globex = server.client("acme"), server.client("globex")
    mine = server.state
    for call in (
        lambda: globex.files.retrieve(mine["file"]),
        lambda: globex.files.content(mine["file"]),
        lambda: globex.files.delete(mine["file"]),
        lambda: globex.fine_tuning.jobs.retrieve(mine["job"]),
        lambda: globex.fine_tuning.jobs.cancel(mine["job"]),
        lambda: list(globex.fine_tuning.jobs.list_events(mine["job"])),
        lambda: list(globex.fine_tuning.jobs.checkpoints.list(mine["job"])),
        lambda: globex.chat.completions.create(
            model=mine["model"], messages=[{"role": "user", "content": "hi"}], max_tokens=2
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert list(globex.files.list()) == [] and list(globex.fine_tuning.jobs.list()) == []
    assert mine["model"] not in {m.id for m in globex.models.list()}
    with pytest.raises(openai.BadRequestError):  # another tenant's file is no file
        globex.fine_tuning.jobs.create(training_file=mine["file"], model="tiny-llama")
    theirs = _upload(globex, SUPPORT[:3])
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(theirs.id)
    assert theirs.id not in {f.id for f in acme.files.list()}
    import requests  # a list filter this server does not offer is refused, not ignored

    r = requests.get(f"{server.url}/v1/fine_tuning/jobs", params={"metadata[team]": "x"},
                     headers={"Authorization": f"Bearer {KEYS['acme']}"}, timeout=30)  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata[team]", r.text
    admin = server.client("admin")  # the admin key sees every tenant's
    assert {mine["file"], theirs.id} <= {f.id for f in admin.files.list()}
    assert admin.fine_tuning.jobs.retrieve(mine["job"]).organization_id == "acme"


def test_bad_line_fails_the_job_naming_it(server):
    c = server.client("acme")
    bad = json.loads(SUPPORT[1])
    bad["messages"] = [m for m in bad["messages"] if m["role"] != "assistant"]
    f = _upload(c, [SUPPORT[0], json.dumps(bad), SUPPORT[2]])
    job = c.fine_tuning.jobs.create(training_file=f.id, model="tiny-llama")
    job = _wait_job(c, job.id, ("failed", "succeeded", "running"), timeout=60)
    assert job.status == "failed"
    assert job.error.param == "training_file" and job.error.code == "invalid_training_file"
    assert job.error.message.startswith(f"{f.id} line 2, field messages")
    with pytest.raises(openai.BadRequestError) as e:  # bounds and methods refused up front
        c.fine_tuning.jobs.create(
            training_file=f.id, model="tiny-llama", hyperparameters={"n_epochs": 99}
        )
    assert "n_epochs" in e.value.message
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.jobs.create(training_file=f.id, model="gpt-4o-mini")


def test_dpo_job_from_a_preference_file(server):
    c = server.client("acme")
    rows = []
    for line in SUPPORT[:12]:
        msgs = json.loads(line)["messages"]
        good = msgs[-1]["content"]
        rows.append(json.dumps({
            "input": {"messages": msgs[:-1]},
            "preferred_output": [{"role": "assistant", "content": good}],
            "non_preferred_output": [{"role": "assistant", "content": "I cannot help."}],
        }))  # fmt: skip
    f = _upload(c, rows, "prefs.jsonl")
    job = c.fine_tuning.jobs.create(
        training_file=f.id, model="tiny-llama",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1}}},
    )  # fmt: skip
    job = _wait_job(c, job.id, ("succeeded", "failed"))
    assert job.status == "succeeded", job.error
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    yaml_text = (Path(server.job.parent) / "run/fine_tuning/jobs" / job.id / "job.yaml").read_text()
    assert "objective: dpo" in yaml_text and "dpo_beta: 0.2" in yaml_text
    r = c.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert r.usage.completion_tokens >= 1


def test_cancel_a_running_job(server):
    c = server.client("globex")
    f = _upload(c, SUPPORT)
    job = c.fine_tuning.jobs.create(
        training_file=f.id, model="tiny-llama", hyperparameters={"n_epochs": 10}
    )
    _wait_job(c, job.id, ("running",), timeout=240)
    job = c.fine_tuning.jobs.cancel(job.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    jsc = _jsc({"dashboard": server.dashboard})
    ray_jobs = [j for j in jsc.list_jobs() if (j.metadata or {}).get("job") == job.id]
    _wait("the Ray job was not stopped",
          lambda: str(jsc.get_job_status(ray_jobs[0].submission_id).value) == "STOPPED", [],
          timeout=60)  # fmt: skip
    time.sleep(2)  # the loop does not revive it
    assert c.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.jobs.cancel(job.id)


def test_restart_in_the_middle_of_a_job(server):
    """A job running when `rayft serve` stops goes on on the cluster; the restarted server lists
    every job, finishes this one and serves its model, the earlier ones' and what the admin API
    loaded (adapters, experiments: kept in the service's database)."""
    import requests

    c = server.client("acme")
    f = _upload(c, SUPPORT)
    job = c.fine_tuning.jobs.create(training_file=f.id, model="tiny-llama", suffix="again")
    waiting = c.fine_tuning.jobs.create(training_file=f.id, model="tiny-llama")
    _wait_job(c, job.id, ("running",), timeout=240)
    assert _wait_job(c, waiting.id, ("queued",), timeout=30).status == "queued"  # 1 at a time
    assert c.fine_tuning.jobs.cancel(waiting.id).status == "cancelled"
    admin = {"Authorization": f"Bearer {ADMIN}"}
    first = server.state["model"]
    adapter = Path(server.job.parent) / "run/fine_tuning/jobs" / server.state["job"] / "run"
    loads = [
        ("adapters", {"name": "support-admin", "path": str(adapter)}),
        ("experiments", {"name": "exp", "arms": {"base": 1, first: 1}}),
    ]
    for what, body in loads:
        r = requests.post(f"{server.url}/admin/{what}", json=body, headers=admin, timeout=120)
        assert r.status_code == 200, r.text
    server.stop()  # the Ray job goes on on the cluster
    server.start()
    c = server.client("acme")
    assert {server.state["job"], job.id, waiting.id} <= {j.id for j in c.fine_tuning.jobs.list()}
    job = _wait_job(c, job.id, ("succeeded", "failed"))
    assert job.status == "succeeded", job.error
    assert c.fine_tuning.jobs.retrieve(waiting.id).status == "cancelled"
    for name in (job.fine_tuned_model, first, "support-admin", "exp"):  # all served again
        r = c.chat.completions.with_raw_response.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert r.parse().choices[0].message.content is not None
    globex = server.client("globex")
    with pytest.raises(openai.NotFoundError):  # still acme's alone
        globex.chat.completions.create(
            model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
