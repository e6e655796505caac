"""`rayft cluster status`: what a Ray cluster has, what of it is free, and rayft's running jobs.

The address may be the cluster's GCS (`HEAD:6379`, what stages take) or its dashboard
(`http://HEAD:8265`, what `rayft submit` takes); with neither, an embedded local Ray is started
and described (it has no dashboard, hence no jobs).
"""

from __future__ import annotations

from typing import Any

from rayft.cluster.jobs import _refusals, auth_headers, client, rayft_jobs


def _is_dashboard(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def resources(address: str | None = None) -> dict[str, Any]:
    """Alive nodes, (total, available) CPUs and GPUs and the dashboard URL (None without a
    dashboard), connecting as a driver."""
    import ray
    from ray._private.worker import get_dashboard_url  # no public getter for a connected driver

    from rayft.cluster.connect import ray_session

    with ray_session(address):
        total = ray.cluster_resources()
        free = ray.available_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        url = get_dashboard_url() or None
    return {
        "nodes": len(nodes),
        "cpus": (total.get("CPU", 0.0), free.get("CPU", 0.0)),
        "gpus": (total.get("GPU", 0.0), free.get("GPU", 0.0)),
        "dashboard": f"http://{url}" if url and "://" not in url else url,
    }


def dashboard_resources(url: str) -> dict[str, Any]:
    """Alive nodes and total CPUs/GPUs over the dashboard's State API (no driver needed; the
    State API reports totals only, so `available` is None)."""
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    with _refusals(url):
        api = StateApiClient(address=url, headers=auth_headers())
        nodes = api.list(
            StateResource.NODES, options=ListApiOptions(detail=True), raise_on_missing_output=False
        )
    alive = [n for n in nodes if n.state == "ALIVE"]
    return {
        "nodes": len(alive),
        "cpus": (sum(n.resources_total.get("CPU", 0.0) for n in alive), None),
        "gpus": (sum(n.resources_total.get("GPU", 0.0) for n in alive), None),
        "dashboard": url,
    }


def running_jobs(dashboard: str) -> list[dict[str, str]]:
    from ray.job_submission import JobStatus

    jsc = client(dashboard)
    with _refusals(dashboard):
        active = [j for j in rayft_jobs(jsc) if j.status in (JobStatus.PENDING, JobStatus.RUNNING)]
    return [
        {
            "id": j.submission_id,
            "status": j.status.value,
            "stage": (j.metadata or {}).get("stage", "?"),
            "config": (j.metadata or {}).get("config", "?"),
        }
        for j in active
    ]


def status(address: str | None = None) -> dict[str, Any]:
    """Print and return nodes, CPU/GPU totals (available/total) and running rayft jobs."""
    from rayft.cluster.connect import resolve_address

    target = resolve_address(address)
    info = dashboard_resources(target) if _is_dashboard(target) else resources(target)
    dashboard = info["dashboard"]
    info["jobs"] = running_jobs(dashboard) if dashboard else []

    def amount(pair: tuple[float, float | None]) -> str:
        total, free = pair
        return f"{total:g} total" if free is None else f"{free:g} available / {total:g} total"

    print(f"nodes: {info['nodes']}")
    print(f"CPUs:  {amount(info['cpus'])}")
    print(f"GPUs:  {amount(info['gpus'])}")
    if dashboard:
        print(f"rayft jobs running: {len(info['jobs'])}")
        for j in info["jobs"]:
            print(f"  {j['id']}  {j['status']:<8}  {j['stage']:<8}  {j['config']}")
    return info
