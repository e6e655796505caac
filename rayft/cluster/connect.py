"""Connect to Ray: an existing cluster (`--address` / RAY_ADDRESS) or an embedded local one.

rayft starts the embedded Ray with `address="local"` so it never attaches by accident to some
other cluster on the machine, and stops it again when the stage ends.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import ray


def local_cpus(num_workers: int = 1, cpus_per_worker: float = 1.0) -> int:
    """Logical CPUs for an embedded Ray: the machine's, but never fewer than the training
    workers need plus two for the Ray Data tasks that feed them. With only os.cpu_count() on a
    2-core machine, two workers take every CPU and the data pipeline waits forever for one."""
    return max(os.cpu_count() or 1, math.ceil(num_workers * cpus_per_worker) + 2)


def resolve_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Use the Ray that is already initialised, the cluster at `address`, or start a local one."""
    if ray.is_initialized():
        yield
        return
    target = resolve_address(address)
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if target:
        ray.init(address=target, runtime_env=env, log_to_driver=True)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            runtime_env=env,
            log_to_driver=True,
        )
    try:
        yield
    finally:
        ray.shutdown()
