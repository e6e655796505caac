"""Shared fixtures: a real local Ray, the tiny test model, scratch run directories."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """Path of the tiny-llama directory (built once, shared by every process)."""
    from rayft import models

    return str(models.pull("tiny-llama"))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray for the whole session. 4 logical CPUs on 2 cores: training workers and
    the Ray Data tasks that feed them need to be schedulable at the same time."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
