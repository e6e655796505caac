"""Connect to Ray: an existing cluster (`--address` / RAY_ADDRESS) or an embedded local one.

rayft starts the embedded Ray with `address="local"` so it never attaches by accident to some
other cluster on the machine, and stops it again when the stage ends.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Iterator

import ray

from rayft.config.cluster import STAGE_ENV_VARS


def local_cpus(num_workers: int = 1, cpus_per_worker: float = 1.0) -> int:
    """Logical CPUs for an embedded Ray: the machine's, but never fewer than the training
    workers need plus two for the Ray Data tasks that feed them. With only os.cpu_count() on a
    2-core machine, two workers take every CPU and the data pipeline waits forever for one."""
    return max(os.cpu_count() or 1, math.ceil(num_workers * cpus_per_worker) + 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


def in_ray_job() -> bool:
    """Whether this process is the driver of a Ray Job (Ray hands a job's driver its config in
    this variable): one of `rayft submit`, whose pre-flight ran before the submission, or of a
    KubeRay RayJob, whose cluster `rayft k8s render` sized from the same config (and whose
    workers may still be joining when the job starts)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


@contextlib.contextmanager
def ray_session(
    address: str | None = None, num_cpus: int | None = None, dashboard: bool = True
) -> Iterator[bool]:
    """Use the Ray that is already initialised, the cluster at `address`, or start a local one
    (with its dashboard unless `dashboard` is False: a stage that runs no Ray Train needs none,
    and on a small machine its processes take CPU from the work). Yields whether this session
    started that local Ray (what it may stop, it alone owns)."""
    if ray.is_initialized():
        yield False
        return
    target = resolve_address(address)
    env = {"env_vars": dict(STAGE_ENV_VARS)}
    if target:
        ray.init(address=target, runtime_env=env, log_to_driver=True)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            # Ray Train's placement-group cleaner polls the State API, which the dashboard
            # serves: without it, a warning every second. The port is any free one, so two
            # embedded Rays on one machine never collide.
            include_dashboard=dashboard,
            **({"dashboard_port": _free_port()} if dashboard else {}),
            runtime_env=env,
            log_to_driver=True,
        )
    try:
        yield not target
    finally:
        ray.shutdown()
