"""`rayft cluster status`: what a Ray cluster has, and what of it is free."""

from __future__ import annotations

from typing import Any

import ray

from rayft.cluster.connect import ray_session


def resources(address: str | None = None) -> dict[str, Any]:
    """Alive nodes and total/available CPUs and GPUs of the cluster at `address`."""
    with ray_session(address):
        total = ray.cluster_resources()
        free = ray.available_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {
        "nodes": len(nodes),
        "cpus": (total.get("CPU", 0.0), free.get("CPU", 0.0)),
        "gpus": (total.get("GPU", 0.0), free.get("GPU", 0.0)),
    }


def status(address: str | None = None) -> dict[str, Any]:
    """Print and return the cluster's nodes and CPU/GPU totals (available/total)."""
    info = resources(address)
    cpu_total, cpu_free = info["cpus"]
    gpu_total, gpu_free = info["gpus"]
    print(f"nodes: {info['nodes']}")
    print(f"CPUs:  {cpu_free:g} available / {cpu_total:g} total")
    print(f"GPUs:  {gpu_free:g} available / {gpu_total:g} total")
    return info
