"""The fine-tuning service against the CLI: the same small job (SmolLM2, the demo data) through
OpenAI's fine-tuning API on `rayft serve` and through `rayft prepare` + `rayft train`, one run
each, on the same embedded-Ray setup.

Measured:
  * wall time from the upload to the first chat answer of the new `ft:` model, as a ratio to
    the wall time of `rayft prepare` + `rayft train` on the same job file (goal: <= 1.10). The
    server's start-up (until GET /health answers) is not counted;
  * queue-to-running latency: the job's `created_at` to its event "Fine-tuning job started"
    (both whole seconds), and, client-side, from `create()` returning to the first `retrieve()`
    that shows `running` (polled every 0.2 s);
  * chat latency on the new model while a second job (same file, another suffix) trains on the
    same node, against the same requests with no job running: median and p90 of sequential
    chat completions (max_tokens 16, temperature 0), and their ratios.

Both arms train the same number of steps: the API job sends no hyperparameters (all `auto`),
and `n_epochs: auto` keeps the job file's training.max_steps (checked against the job's
events). The job file has no validation or test split, the way the service writes a job's own
file, so both arms do the same work. Both checkpoint every --save-steps steps: a running job's
steps reach the service (metrics.jsonl, hence its events) only with a checkpoint, an evaluation
or the end, and the chat phase under training waits for the second job's first step event.
One run, one machine: the numbers are printed, never asserted.

    .venv/bin/python benchmarks/bench_ft_service.py [--rows 48] [--steps 10] [--save-steps 5]
        [--chats 10] [--epochs2 5] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BASE = "smollm2-135m-instruct"
API_KEY = "sk-bench-ft-5e21"
SEED = 42
PROMPT = [{"role": "user", "content": "My order A123 arrived broken, what can I do?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _job_file(path: Path, run_dir: Path, data: Path, port: int, steps: int, save: int) -> None:
    path.write_text(
        f"name: bench-ft\nrun_dir: {run_dir}\nmodel: {{base: {BASE}}}\n"
        f"data:\n  train_files: [{data}]\n  format: auto\n  on_error: fail\n"
        "  max_seq_len: 256\n  dedupe: {near: false}\n  split: {validation: 0.0, test: 0.0}\n"
        f"training:\n  method: lora\n  max_steps: {steps}\n  learning_rate: 1.0e-3\n"
        "  lr_scheduler: cosine\n  warmup_ratio: 0.05\n  per_device_batch_size: 1\n"
        f"  gradient_accumulation_steps: 1\n  eval_steps: null\n  save_steps: {save}\n"
        f"  seed: {SEED}\n"
        "  lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}\n"
        "cluster: {num_workers: 1, use_gpu: false}\n"
        f"serve:\n  port: {port}\n  api_key: {API_KEY}\n"
        "  fine_tuning: {enabled: true, max_running_jobs: 1, poll_s: 0.5}\n"
    )


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _errors(path: Path, lines: int = 6) -> str:
    """The last lines of a log that name an error, else its plain end."""
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    found = [x for x in text if "Error" in x or "failed" in x]
    return "\n".join(found[-lines:]) or _tail(path, lines)


def _other_rays() -> int:
    """Ray instances (GCS processes) already on this machine: another one shifts the timings,
    and holds the ports an embedded Ray's dashboard agent wants (Ray Jobs need that agent)."""
    n = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            n += b"gcs_server" in cmdline.read_bytes().split(b"\0")[0]
    return n


def _run(args: list[str], log: Path, cwd: Path) -> float:
    """Seconds `rayft ARGS` took; its output goes to `log`. A failure raises with the log's end."""
    start = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(
            [str(BIN / "rayft"), *args], cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT
        ).returncode
    took = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"`rayft {' '.join(args)}` exited {rc}; its log ends:\n{_tail(log)}")
    return took


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _wait_status(c: openai.OpenAI, job_id: str, states: tuple[str, ...], every: float,
                 timeout: float, log: Path):  # fmt: skip
    """(job, seconds) once the job is in one of `states` (or has ended)."""
    start = time.perf_counter()
    while True:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if job.status in states or job.status in ("succeeded", "failed", "cancelled"):
            return job, time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise SystemExit(
                f"job {job_id} still {job.status} after {timeout:.0f} s; rayft serve's last "
                f"errors:\n{_errors(log)}"
            )
        time.sleep(every)


def _events(c: openai.OpenAI, job_id: str) -> list:
    return sorted(c.fine_tuning.jobs.list_events(job_id, limit=100), key=lambda e: e.created_at)


def _chat(c: openai.OpenAI, model: str) -> float:
    start = time.perf_counter()
    r = c.chat.completions.create(model=model, messages=PROMPT, max_tokens=16, temperature=0)
    took = time.perf_counter() - start
    if not r.choices or r.choices[0].message.content is None:
        raise SystemExit(f"chat on {model} answered no content: {r}")
    return took


def _p90(xs: list[float]) -> float:
    s = sorted(xs)
    return s[math.ceil(0.9 * len(s)) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48, help="rows of examples/data/support.jsonl")
    parser.add_argument("--steps", type=int, default=10, help="training.max_steps of both arms")
    parser.add_argument("--save-steps", type=int, default=5, help="training.save_steps of both")
    parser.add_argument("--chats", type=int, default=10, help="chat requests per latency phase")
    parser.add_argument("--epochs2", type=int, default=5, help="n_epochs of the second job")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bft", dir="/tmp"))  # short: Ray's socket paths
    rows = (ROOT / "examples/data/support.jsonl").read_text().splitlines()[: args.rows]
    data = work / "train.jsonl"
    data.write_text("\n".join(rows) + "\n")
    port = _free_port()
    cli_job, api_job = work / "cli.yaml", work / "api.yaml"
    for path, run in ((cli_job, "cli_run"), (api_job, "api_run")):  # the same but for run_dir
        _job_file(path, work / run, data, port, args.steps, args.save_steps)
    print(f"work dir {work}; {len(rows)} rows, max_seq_len 256, {args.steps} steps, LoRA r16, "
          "1 training worker", flush=True)  # fmt: skip

    # ---------------------------------------------------------------- the CLI arm
    if others := _other_rays():
        print(f"WARNING: {others} other Ray instance(s) run on this machine: timings are "
              "skewed, and the service's jobs may not start (see rayft serve's log)",
              flush=True)  # fmt: skip
    load = {"CLI arm": os.getloadavg()[0]}  # other work on the machine skews one-run timings
    prep_s = _run(["prepare", str(cli_job)], work / "cli_prepare.log", work)
    train_s = _run(["train", str(cli_job)], work / "cli_train.log", work)
    cli_s = prep_s + train_s
    if not (work / "cli_run/adapter").is_dir():
        raise SystemExit(f"`rayft train` left no adapter in {work / 'cli_run/adapter'}")
    print(f"CLI: prepare {prep_s:.1f} s + train {train_s:.1f} s = {cli_s:.1f} s", flush=True)

    # ---------------------------------------------------------------- the API arm
    url = f"http://127.0.0.1:{port}"
    serve_log = work / "serve.log"
    proc = None
    second = None
    ok = False
    c = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
    try:
        with serve_log.open("w") as out:
            start = time.perf_counter()
            proc = subprocess.Popen(
                [str(BIN / "rayft"), "serve", str(api_job)], cwd=work, env=_env(),
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        while not _health(url):
            if proc.poll() is not None:
                raise SystemExit(f"rayft serve exited {proc.returncode}:\n{_tail(serve_log)}")
            if time.perf_counter() - start > 300:
                raise SystemExit(f"rayft serve not up after 300 s:\n{_tail(serve_log)}")
            time.sleep(0.5)
        up_s = time.perf_counter() - start
        print(f"rayft serve up in {up_s:.1f} s (not counted)", flush=True)

        load["API arm"] = os.getloadavg()[0]
        t0 = time.perf_counter()
        f = c.files.create(file=("train.jsonl", io.BytesIO(data.read_bytes())), purpose="fine-tune")
        # No hyperparameters: each is `auto`, and n_epochs auto keeps training.max_steps.
        job = c.fine_tuning.jobs.create(training_file=f.id, model=BASE, suffix="bench", seed=SEED)
        t_created = time.perf_counter()
        job, to_running = _wait_status(c, job.id, ("running",), 0.2, 180, serve_log)
        if job.status != "running":
            raise SystemExit(f"job {job.id} {job.status} before running: {job.error}")
        job, _ = _wait_status(c, job.id, (), 0.5, 1800, serve_log)
        t_succeeded = time.perf_counter()
        if job.status != "succeeded":
            raise SystemExit(f"job {job.id} {job.status}: {job.error}\n{_tail(serve_log)}")
        first_chat = _chat(c, job.fine_tuned_model)
        api_s = time.perf_counter() - t0
        print(
            f"API: upload to first chat answer {api_s:.1f} s ({job.fine_tuned_model})", flush=True
        )

        events = _events(c, job.id)
        started = [e.created_at for e in events if e.message == "Fine-tuning job started"]
        metrics = [e for e in events if e.type == "metrics"]
        total = metrics[0].data["total_steps"] if metrics else None
        steps = sorted({e.data["step"] for e in metrics})
        if total != args.steps or steps != list(range(1, args.steps + 1)):
            print(f"WARNING: the API job trained steps {steps} of {total}, the CLI {args.steps}")
        queue_s = started[0] - job.created_at if started else None
        done = [e.created_at for e in events if e.message.startswith("New fine-tuned model")]
        train_api = (done[0] - started[0]) if started and done else None

        # ------------------------------------------------------------ chat latency
        idle = [_chat(c, job.fine_tuned_model) for _ in range(args.chats)]
        second = c.fine_tuning.jobs.create(
            training_file=f.id, model=BASE, suffix="bench2", seed=SEED,
            hyperparameters={"n_epochs": args.epochs2},
        )  # fmt: skip
        second, to_running2 = _wait_status(c, second.id, ("running",), 0.2, 180, serve_log)
        if second.status != "running":
            raise SystemExit(f"second job {second.status}: {second.error}")
        wait_start = time.perf_counter()  # until its first step event: training proper
        while not any(e.type == "metrics" for e in _events(c, second.id)):
            if time.perf_counter() - wait_start > 600:
                raise SystemExit("the second job logged no step in 600 s")
            if c.fine_tuning.jobs.retrieve(second.id).status != "running":
                break
            time.sleep(1)
        to_step2 = time.perf_counter() - wait_start + to_running2
        load["chat under training"] = os.getloadavg()[0]
        loaded = [_chat(c, job.fine_tuned_model) for _ in range(args.chats)]
        after = c.fine_tuning.jobs.retrieve(second.id)
        step_events = [e for e in _events(c, second.id) if e.type == "metrics"]
        last_step = max((e.data["step"] for e in step_events), default=0)
        still = after.status == "running"
        if still:
            c.fine_tuning.jobs.cancel(second.id)
            second, _ = _wait_status(c, second.id, ("cancelled",), 0.5, 60, serve_log)
        ok = True
    finally:
        if second is not None and proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                if c.fine_tuning.jobs.retrieve(second.id).status in ("queued", "running"):
                    c.fine_tuning.jobs.cancel(second.id)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                print(f"rayft serve did not stop in 180 s after SIGTERM:\n{_tail(serve_log)}")
                proc.kill()
                proc.wait()
        if proc is not None and proc.returncode not in (0, None):
            print(f"rayft serve exited {proc.returncode}; its log ends:\n{_tail(serve_log, 15)}")
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif not ok:
            print(f"logs kept in {work}")

    # ---------------------------------------------------------------- the table
    idle_med, load_med = statistics.median(idle), statistics.median(loaded)
    idle_p90, load_p90 = _p90(idle), _p90(loaded)
    print()
    print(f"machine: {os.cpu_count()} CPU cores, {platform.machine()}, no GPU; "
          "timings from one run each, not averaged")  # fmt: skip
    print(f"job: {BASE}, LoRA, {len(rows)} rows of the demo data, {args.steps} steps "
          f"(API job: total_steps {total}, steps logged {len(steps)})")  # fmt: skip
    rows_out = [
        ("CLI prepare + train (wall)", f"{cli_s:.1f} s",
         f"prepare {prep_s:.1f} + train {train_s:.1f}"),
        ("API upload -> first ft: chat answer", f"{api_s:.1f} s",
         f"upload+create {t_created - t0:.2f} s, to succeeded {t_succeeded - t0:.1f} s, "
         f"first chat {first_chat:.2f} s"),
        ("  ratio API / CLI", f"{api_s / cli_s:.3f}", "goal <= 1.10"),
        ("  API job started -> model served", "-" if train_api is None else f"{train_api} s",
         "events (whole seconds)"),
        ("queue -> running (events)", "-" if queue_s is None else f"{queue_s} s",
         "created_at -> 'Fine-tuning job started', whole s"),
        ("queue -> running (client)", f"{to_running:.2f} s",
         "create() returned -> retrieve() says running, 0.2 s polls"),
        ("  2nd job queue -> running (client)", f"{to_running2:.2f} s",
         f"first step event {to_step2:.1f} s after create"),
        (f"chat idle, {args.chats} requests", f"{idle_med:.3f} s", f"p90 {idle_p90:.3f} s"),
        ("chat while 2nd job trains", f"{load_med:.3f} s",
         f"p90 {load_p90:.3f} s; 2nd job at step {last_step}, "
         + ("still running" if still else f"{after.status} before the end")),
        ("  ratio training / idle (median)", f"{load_med / idle_med:.2f}",
         f"p90 ratio {load_p90 / idle_p90:.2f}"),
    ]  # fmt: skip
    for name, value, note in rows_out:
        print(f"{name:38s} {value:>10s}  {note}")
    print(f"(rayft serve start-up, not counted: {up_s:.1f} s)")
    print("1-min load average at the start of: "
          + ", ".join(f"{k} {v:.2f}" for k, v in load.items()))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
