"""Run rayft stages as Ray Jobs on an existing cluster (`rayft submit`, `rayft jobs`).

Token authentication (Ray >= 2.52): the token comes from RAY_AUTH_TOKEN or the file named by
RAY_AUTH_TOKEN_PATH and is sent as a Bearer header whether or not RAY_AUTH_MODE is set here.
~/.ray/auth_token is used only with RAY_AUTH_MODE=token (Ray's own rule), so the token of a
local cluster is never sent to some other address by accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import rayft
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
    but not rayft itself.
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
    package = Path(rayft.__file__).resolve().parent
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
        ["python", "-m", "rayft.cli", *args[:words], relative.as_posix(), *rest, *sets]
    )
    return {
        "entrypoint": entrypoint,
        "runtime_env": {
            "working_dir": str(root),
            "py_modules": [str(package)],
            "excludes": excludes,
            # No env_vars: the stage's own ray.init sets them, and Ray refuses a job whose
            # runtime_env repeats a key of the driver's.
        },
        "metadata": {RAYFT_KEY: "1", "stage": stage, "config": relative.as_posix()},
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


def submit(
    config_path: str | Path,
    stage_args: Sequence[str],
    address: str | None = None,
    overrides: Sequence[str] = (),
    follow: bool = True,
    project: str | Path | None = None,
) -> int:
    """Submit a stage as a Ray Job; with `follow`, stream its logs and return its exit status."""
    from ray.job_submission import JobStatus

    spec = submission(config_path, stage_args, overrides, project)
    jsc = client(address)
    target = dashboard_address(address)
    with _refusals(target):
        job_id = jsc.submit_job(**spec)
        print(f"submitted {job_id}: {spec['entrypoint']}", flush=True)
        if not follow:
            return 0
        follow_logs(jsc, job_id)
        final = jsc.get_job_status(job_id)
    print(f"{job_id}: {final.value}")
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
