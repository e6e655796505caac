"""Run rayft stages as Ray Jobs on an existing cluster (`rayft submit`, `rayft jobs`).

A stage is submitted after its pre-flight (rayft.cluster.preflight), which runs on the cluster as
a tiny job of its own in the stage's interpreter (`cluster.python`) and runtime environment
(`cluster.runtime_env`); the job's metadata records the run dir, for `rayft jobs fetch`.

Token authentication (Ray >= 2.52): the token comes from RAY_AUTH_TOKEN or the file named by
RAY_AUTH_TOKEN_PATH and is sent as a Bearer header whether or not RAY_AUTH_MODE is set here.
~/.ray/auth_token is used only with RAY_AUTH_MODE=token (Ray's own rule), so the token of a
local cluster is never sent to some other address by accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import rayft
from rayft.cluster import preflight
from rayft.config import JobConfig, load_config
from rayft.errors import RayftError

# Ray Jobs have no owner field: this metadata key is how `rayft jobs` / `cluster status` tell
# rayft's jobs from everything else running on a shared cluster.
RAYFT_KEY = "rayft"

# Never uploaded with the project: environments, VCS data, run outputs and caches. Ray also
# honours the project's .gitignore.
EXCLUDES = [
    ".git/",
    ".venv/",
    "venv/",
    "runs/",
    "__pycache__/",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
    "*.safetensors",
    "*.gguf",
    "*.bin",
    "*.pt",
]


def _package() -> Path:
    return Path(rayft.__file__).resolve().parent


def submission(
    config_path: str | Path,
    stage_args: Sequence[str],
    overrides: Sequence[str] = (),
    project: str | Path | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `JobSubmissionClient.submit_job` that run one stage remotely.

    The project directory (default: the current one, where the config's relative paths
    resolve) is the job's working_dir, so the config and the data files it names travel with
    it; the rayft package travels as a py_module, so the cluster needs rayft's dependencies
    but not rayft itself. `cluster.python` runs it, in `cluster.runtime_env` (pip/uv packages,
    env vars) merged into the job's runtime environment.
    """
    args = [a for a in stage_args if a != "--"]
    if not args:
        raise RayftError("rayft submit: no stage given; use `rayft submit CONFIG -- STAGE [ARGS]`")
    config = Path(config_path)
    if not config.is_file():
        raise RayftError(f"rayft submit: config file {config} not found; pass an existing job file")
    root = Path(project or Path.cwd()).resolve()
    try:
        relative = config.resolve().relative_to(root)
    except ValueError:
        raise RayftError(
            f"rayft submit: config {config} is outside the project directory {root} that is "
            "uploaded with the job; run from the config's project or pass --project DIR"
        ) from None
    cfg = load_config(config, list(overrides))
    package = _package()
    excludes = list(EXCLUDES)
    with contextlib.suppress(ValueError):  # the package is uploaded once, as the py_module
        excludes.append("/" + package.relative_to(root).as_posix() + "/")
    # The subcommand words (`train`, `ab report`) come before the config, options after it.
    words = 1
    while words < len(args) and not args[words].startswith("-"):
        words += 1
    stage, rest = " ".join(args[:words]), args[words:]
    sets = [f"--set={o}" for o in overrides]
    entrypoint = shlex.join(
        [*shlex.split(cfg.cluster.python), "-m", "rayft.cli", *args[:words],
         relative.as_posix(), *rest, *sets]
    )  # fmt: skip
    return {
        "entrypoint": entrypoint,
        "runtime_env": {
            "working_dir": str(root),
            "py_modules": [str(package)],
            "excludes": excludes,
            # Its env_vars never repeat the stage's own ray.init's (the config refuses them):
            # Ray refuses such a job.
            **cfg.cluster.runtime_env,
        },
        "metadata": {
            RAYFT_KEY: "1",
            "stage": stage,
            "config": relative.as_posix(),
            "run_dir": cfg.run_dir,
            "python": cfg.cluster.python,
        },
    }


def auth_headers() -> dict[str, str]:
    """The Authorization header for a token-authenticated cluster, when a token is given."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise RayftError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token ({e})") from e
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextlib.contextmanager
def _refusals(target: str) -> Iterator[None]:
    """Turn Ray's authentication and connection errors into one-line RayftErrors."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        given = "RAY_AUTH_TOKEN" in os.environ or "RAY_AUTH_TOKEN_PATH" in os.environ
        what = "rejected the token" if given else "needs a token and none was given"
        raise RayftError(
            f"the Ray cluster at {target} {what}: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) "
            "to the cluster's token (KubeRay: the auth_token key of the cluster's Secret)"
        ) from exc
    except (ConnectionError, OSError) as exc:
        raise RayftError(f"cannot reach the Ray dashboard at {target}: {exc}") from exc
    except RuntimeError as exc:  # the Jobs SDK's answer to any other HTTP error
        raise RayftError(f"the Ray dashboard at {target} refused: {exc}") from exc


def dashboard_address(address: str | None) -> str:
    target = address or os.environ.get("RAY_ADDRESS")
    if not target:
        raise RayftError("no Ray cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if "://" not in target:
        target = f"http://{target}"
    return target


def client(address: str | None):
    """A JobSubmissionClient for the dashboard at `address` (or RAY_ADDRESS)."""
    from ray.job_submission import JobSubmissionClient

    target = dashboard_address(address)
    with _refusals(target):
        return JobSubmissionClient(target, headers=auth_headers())


def follow_logs(jsc, job_id: str) -> None:
    """Print the job's log lines as they arrive, until the job ends."""

    async def _tail() -> None:
        async for lines in jsc.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(_tail())


def tiny_job(
    jsc, python: str, runtime_env: dict[str, Any], module: str, ask: dict[str, Any], timeout: float
) -> str:
    """Run `PYTHON -m MODULE JSON` on the cluster as a Ray Job in `runtime_env` (a stage's
    packages and env vars, not the project), and return its log. Its metadata keeps it out of
    `rayft jobs list`."""
    from ray.job_submission import JobStatus

    job_id = jsc.submit_job(
        entrypoint=shlex.join([*shlex.split(python), "-m", module, json.dumps(ask)]),
        runtime_env={"py_modules": [str(_package())], **runtime_env},
        metadata={RAYFT_KEY: module.rsplit(".", 1)[-1]},
    )
    start = told = time.monotonic()
    while not (status := jsc.get_job_status(job_id)).is_terminal():
        if time.monotonic() - start > timeout:
            jsc.stop_job(job_id)
            raise RayftError(f"{module} job {job_id} did not finish within {timeout:.0f} s")
        if time.monotonic() - told > 30:
            told = time.monotonic()
            why = " (setting up cluster.runtime_env)" if status == JobStatus.PENDING else ""
            print(f"[rayft] waiting for job {job_id}: {status.value}{why}", flush=True)
        time.sleep(0.5)
    logs = jsc.get_job_logs(job_id)
    if status != JobStatus.SUCCEEDED:
        tail = "\n    ".join(logs.strip().splitlines()[-6:]) or jsc.get_job_info(job_id).message
        python_fault = "ModuleNotFoundError" in tail or "not found" in tail
        raise RayftError(
            f"the {module} job {job_id} failed on the cluster, run by cluster.python="
            f"{python!r}:\n    {tail}"
            + ("\nFix: set cluster.python to the interpreter of the cluster's environment "
               "(e.g. /opt/venv/bin/python), or add what is missing with cluster.runtime_env.pip"
               if python_fault else "")
        )  # fmt: skip
    return logs


def check_submitted(jsc, cfg: JobConfig, stages: tuple[str, ...], what: str) -> None:
    """The pre-flight of stages to submit: rayft.cluster.survey as a tiny job, judged here."""
    from rayft.cluster.survey import OUTPUT, environment

    if not stages:
        return
    ask = preflight.request(cfg, stages, submitted=True)
    c = cfg.cluster
    logs = tiny_job(jsc, c.python, c.runtime_env, "rayft.cluster.survey", ask, ask["timeout"] + 300)
    line = next((x for x in logs.splitlines() if x.startswith(OUTPUT)), None)
    if line is None:
        raise RayftError(f"the pre-flight job printed no answer; its log ends:\n{logs[-2000:]}")
    found = json.loads(line.removeprefix(OUTPUT))
    here = environment(ask["packages"])
    preflight.judge(cfg, stages, found, client=here).settle(what)


def outputs(cfg: JobConfig, stage: str, job_id: str, since: float) -> str:
    """Where a finished stage's outputs are, and whether this machine sees them."""
    run_dir = Path(cfg.run_dir)
    try:
        done = json.loads((run_dir / "run.json").read_text())["stages"][stage]["finished_at"]
    except (OSError, ValueError, KeyError, TypeError):
        done = ""
    if done >= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)):
        return f"outputs: {run_dir} (this machine sees them)"
    return (
        f"outputs: {run_dir} on the cluster, not visible from this machine; "
        f"`rayft jobs fetch {job_id}` copies the adapter, reports and summaries here"
    )


def submit(
    config_path: str | Path,
    stage_args: Sequence[str],
    address: str | None = None,
    overrides: Sequence[str] = (),
    follow: bool = True,
    project: str | Path | None = None,
) -> int:
    """Submit a stage as a Ray Job, after its pre-flight on the cluster; with `follow`, stream
    its logs, say where its outputs are and return its exit status."""
    from ray.job_submission import JobStatus

    spec = submission(config_path, stage_args, overrides, project)
    cfg = load_config(config_path, list(overrides))
    stage = spec["metadata"]["stage"]
    jsc = client(address)
    target = dashboard_address(address)
    with _refusals(target):
        check_submitted(jsc, cfg, preflight.stages_of(stage), f"{stage} on {target}")
        since = time.time() - 60  # a minute of clock skew between here and the cluster
        job_id = jsc.submit_job(**spec)
        print(f"submitted {job_id}: {spec['entrypoint']}", flush=True)
        if not follow:
            print(f"outputs will be in {cfg.run_dir} on the cluster")
            return 0
        follow_logs(jsc, job_id)
        final = jsc.get_job_status(job_id)
    print(f"{job_id}: {final.value}")
    if final == JobStatus.SUCCEEDED and preflight.stages_of(stage):
        print(outputs(cfg, stage.split()[0], job_id, since))
    return 0 if final == JobStatus.SUCCEEDED else 1


def rayft_jobs(jsc) -> list[Any]:
    """Jobs on the cluster whose metadata marks them as rayft's, oldest first."""
    found = [j for j in jsc.list_jobs() if (j.metadata or {}).get(RAYFT_KEY) == "1"]
    return sorted(found, key=lambda j: j.start_time or 0)


def jobs(
    action: str, job_id: str | None = None, address: str | None = None, follow: bool = False
) -> int:
    """`rayft jobs list|logs|stop`: only jobs whose metadata marks them as rayft's are listed."""
    jsc = client(address)
    with _refusals(dashboard_address(address)):
        if action == "list":
            for job in rayft_jobs(jsc):
                meta = job.metadata or {}
                print(
                    f"{job.submission_id}  {job.status.value:<9}  {meta.get('stage', '?'):<8}  "
                    f"{meta.get('config', '?')}"
                )
            return 0
        if not job_id:
            raise RayftError(f"rayft jobs {action}: give the job id (see `rayft jobs list`)")
        if action == "logs":
            if follow:
                follow_logs(jsc, job_id)
            else:
                print(jsc.get_job_logs(job_id), end="")
            return 0
        if action == "stop":
            stopped = jsc.stop_job(job_id)
            print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")
            return 0
    raise RayftError(f"rayft jobs: unknown action {action!r}; use list, logs or stop")
