"""`rayft cluster status`: what a Ray cluster has and what of it is free, per resource and per
node, and rayft's running jobs with their stage (and training step).

The address may be the cluster's GCS (`HEAD:6379`, what stages take) or its dashboard
(`http://HEAD:8265`, what `rayft submit` takes); with neither, an embedded local Ray is started
and described (it has no dashboard, hence no jobs). Through the dashboard, free amounts come from
the autoscaler's report of logical resources, which lags a few seconds.
"""

from __future__ import annotations

import json
import re
import urllib.request
from typing import Any

from rayft.cluster.jobs import _refusals, auth_headers, client, rayft_jobs

STEP = re.compile(r"\[rayft train\] step (\d+)/(\d+)")
BYTES = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
SHOWN = ("CPU", "GPU", "memory", "object_store_memory")


def _is_dashboard(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def _node(node_id: str, ip: str, total: dict[str, float], free: dict | None) -> dict[str, Any]:
    keep = {r: v for r, v in total.items() if not r.startswith(("node:", "accelerator_type:"))}
    return {
        "node_id": node_id,
        "ip": ip,
        "head": "node:__internal_head__" in total,
        "total": keep,
        "free": None if free is None else {r: free.get(r, 0.0) for r in keep},
    }


def driver_nodes(address: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """Alive nodes with total and free resources, and the dashboard URL (None without one),
    connecting as a driver."""
    import ray
    from ray._private import state  # DeveloperAPI: the only per-node view of free resources
    from ray._private.worker import get_dashboard_url  # no public getter for a connected driver

    from rayft.cluster.connect import ray_session

    with ray_session(address):
        total, free = state.total_resources_per_node(), state.available_resources_per_node()
        alive = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] in total]
        nodes = [
            _node(n["NodeID"], n["NodeManagerAddress"], total[n["NodeID"]],
                  free.get(n["NodeID"], {}))
            for n in alive
        ]  # fmt: skip
        url = get_dashboard_url() or None
    return nodes, (f"http://{url}" if url and "://" not in url else url)


def _amount(text: str) -> float:
    number = re.match(r"[\d.]+", text)
    unit = text[number.end() :] if number else ""
    return float(number.group()) * BYTES.get(unit, 1) if number else 0.0


def _usage(text: str) -> dict[str, tuple[float, float]]:
    """`0.0/2.0 CPU` lines (the dashboard's logical resources of a node) -> used, total."""
    found = {}
    for line in text.splitlines():
        used, _, rest = line.strip().partition("/")
        total, _, name = rest.partition(" ")
        if name:
            found[name.split(" ")[0]] = (_amount(used), _amount(total))
    return found


def dashboard_nodes(url: str) -> list[dict[str, Any]]:
    """Alive nodes over the dashboard (no driver needed): totals from the State API, free from
    the logical resources the dashboard shows per node (None where it has none yet)."""
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    with _refusals(url):
        api = StateApiClient(address=url, headers=auth_headers())
        listed = api.list(
            StateResource.NODES, options=ListApiOptions(detail=True), raise_on_missing_output=False
        )
        request = urllib.request.Request(f"{url}/nodes?view=summary", headers=auth_headers())
        with urllib.request.urlopen(request, timeout=30) as answer:
            logical = json.load(answer)["data"].get("nodeLogicalResources") or {}
    nodes = []
    for n in listed:
        if n.state != "ALIVE":
            continue
        used = _usage(logical.get(n.node_id, ""))
        free = {r: total - used[r][0] for r, total in n.resources_total.items() if r in used}
        nodes.append(_node(n.node_id, n.node_ip, n.resources_total, free if used else None))
    return nodes


def running_jobs(dashboard: str) -> list[dict[str, str]]:
    """rayft's pending and running jobs, with the last training step their log shows."""
    from ray.job_submission import JobStatus

    jsc = client(dashboard)
    with _refusals(dashboard):
        active = [j for j in rayft_jobs(jsc) if j.status in (JobStatus.PENDING, JobStatus.RUNNING)]
        steps = {
            j.submission_id: STEP.findall(jsc.get_job_logs(j.submission_id))[-1:]
            for j in active
            if (j.metadata or {}).get("stage") in ("train", "quickstart")
        }
    return [
        {
            "id": j.submission_id,
            "status": j.status.value,
            "stage": (j.metadata or {}).get("stage", "?"),
            "config": (j.metadata or {}).get("config", "?"),
            "step": "/".join(steps[j.submission_id][0]) if steps.get(j.submission_id) else "",
        }
        for j in active
    ]


def _show(name: str, free: float | None, total: float) -> str:
    if name.endswith("memory"):
        gib = "?" if free is None else f"{free / 2**30:.1f}"
        return f"{gib}/{total / 2**30:.1f} GiB {name.replace('_', ' ')}"
    return f"{'?' if free is None else f'{free:g}'}/{total:g} {name}"


def status(address: str | None = None) -> dict[str, Any]:
    """Print and return free/total per resource and per node, and rayft's running jobs."""
    from rayft.cluster.connect import resolve_address

    target = resolve_address(address)
    if _is_dashboard(target):
        nodes, dashboard = dashboard_nodes(target), target
    else:
        nodes, dashboard = driver_nodes(target)
    names = [r for r in SHOWN if any(r in n["total"] for n in nodes) or r in ("CPU", "GPU")]
    names += sorted({r for n in nodes for r in n["total"]} - set(names))
    known = all(n["free"] is not None for n in nodes)
    resources = {
        r: (
            sum(n["free"].get(r, 0.0) for n in nodes) if known else None,
            sum(n["total"].get(r, 0.0) for n in nodes),
        )
        for r in names
    }
    jobs = running_jobs(dashboard) if dashboard else []
    print(f"nodes: {len(nodes)}")
    print("free/total: " + ", ".join(_show(r, *resources[r]) for r in names))
    for n in nodes:
        have = [r for r in names if r in n["total"]]
        free = n["free"] or {}
        print(
            f"  node {n['ip']}{' (head)' if n['head'] else ''} {n['node_id'][:8]}: "
            + ", ".join(_show(r, free.get(r) if n["free"] else None, n["total"][r]) for r in have)
        )
    if dashboard:
        print(f"rayft jobs running: {len(jobs)}")
        for j in jobs:
            step = f"  step {j['step']}" if j["step"] else ""
            print(f"  {j['id']}  {j['status']:<8}  {j['stage']:<8}  {j['config']}{step}")
    return {"nodes": nodes, "resources": resources, "jobs": jobs, "dashboard": dashboard}
