"""Run rayft stages as Ray Jobs on an existing cluster (`rayft submit`, `rayft jobs`)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import rayft
from rayft.errors import RayftError

# Ray Jobs have no owner field: this metadata key is how `rayft jobs` / `cluster status` tell
# rayft's jobs from everything else running on a shared cluster.
RAYFT_KEY = "rayft"


def submission(
    config_path: str | Path, stage_args: Sequence[str], overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Keyword arguments for `JobSubmissionClient.submit_job` that run one stage remotely.

    The config file travels in a working_dir of its own and the rayft package as a py_module,
    so the cluster needs rayft's dependencies but not a copy of this checkout.
    """
    args = [a for a in stage_args if a != "--"]
    if not args:
        raise RayftError("rayft submit: no stage given; use `rayft submit CONFIG -- STAGE [ARGS]`")
    config = Path(config_path)
    if not config.is_file():
        raise RayftError(f"rayft submit: config file {config} not found; pass an existing job file")
    stage, rest = args[0], args[1:]
    sets = [f"--set={o}" for o in overrides]
    entrypoint = " ".join(["python", "-m", "rayft.cli", stage, config.name, *rest, *sets])
    return {
        "entrypoint": entrypoint,
        "runtime_env": {
            "working_dir": str(config.resolve().parent),
            "py_modules": [str(Path(rayft.__file__).parent)],
            "env_vars": {"TOKENIZERS_PARALLELISM": "false"},
        },
        "metadata": {RAYFT_KEY: "1", "stage": stage, "config": config.name},
    }


def client(address: str | None):
    """A JobSubmissionClient for the dashboard at `address` (or RAY_ADDRESS)."""
    from ray.job_submission import JobSubmissionClient

    target = address or os.environ.get("RAY_ADDRESS")
    if not target:
        raise RayftError("no Ray cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    try:
        return JobSubmissionClient(target)
    except Exception as exc:  # Ray raises ConnectionError / RuntimeError depending on the cause
        raise RayftError(f"cannot reach the Ray dashboard at {target}: {exc}") from exc


def follow_logs(jsc, job_id: str) -> None:
    """Print the job's log lines as they arrive, until the job ends."""

    async def _tail() -> None:
        async for lines in jsc.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(_tail())


def submit(
    config_path: str | Path,
    stage_args: Sequence[str],
    address: str | None = None,
    overrides: Sequence[str] = (),
    follow: bool = True,
) -> int:
    """Submit a stage as a Ray Job; with `follow`, stream its logs and return its exit status."""
    from ray.job_submission import JobStatus

    jsc = client(address)
    job_id = jsc.submit_job(**submission(config_path, stage_args, overrides))
    print(f"submitted {job_id}")
    if not follow:
        return 0
    follow_logs(jsc, job_id)
    final = jsc.get_job_status(job_id)
    print(f"{job_id}: {final.value}")
    return 0 if final == JobStatus.SUCCEEDED else 1


def jobs(action: str, job_id: str | None = None, address: str | None = None) -> int:
    """`rayft jobs list|logs|stop`: only jobs whose metadata marks them as rayft's are listed."""
    jsc = client(address)
    if action == "list":
        for job in jsc.list_jobs():
            meta = job.metadata or {}
            if meta.get(RAYFT_KEY) == "1":
                print(
                    f"{job.submission_id}  {job.status.value:<9}  {meta.get('stage', '?'):<8}  "
                    f"{meta.get('config', '?')}"
                )
        return 0
    if not job_id:
        raise RayftError(f"rayft jobs {action}: give the job id (see `rayft jobs list`)")
    if action == "logs":
        print(jsc.get_job_logs(job_id), end="")
        return 0
    if action == "stop":
        stopped = jsc.stop_job(job_id)
        print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")
        return 0
    raise RayftError(f"rayft jobs: unknown action {action!r}; use list, logs or stop")
