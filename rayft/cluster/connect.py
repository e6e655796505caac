"""Connect to Ray: an existing cluster (`--address` / RAY_ADDRESS) or an embedded local one.

rayft starts the embedded Ray with `address="local"` so it never attaches by accident to some
other cluster on the machine, and stops it again when the stage ends.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import ray


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
