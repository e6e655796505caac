"""What an existing Ray cluster offers, seen from the driver that will run a stage: per node its
free and total resources, the Python and package versions its workers import, and whether the
run's paths are the same storage there as for the driver. One task per node (no CPU, pinned to
the node) finds out.

It runs in that driver: in-process under `--address`, and as a tiny Ray Job
(`python -m rayft.cluster.survey JSON`) before `rayft submit`, with the job's interpreter and
runtime environment, so that it sees what the stage will see. rayft.cluster.preflight judges
the answer.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import platform
import sys
import uuid
from pathlib import Path
from typing import Any

import ray

MARKER = ".rayft-preflight-"
OUTPUT = "RAYFT_SURVEY "  # the line of the probe job's log that carries the answer


def version(name: str) -> tuple[str | None, str | None]:
    """The version of `name` that `import name` gives here (None: it cannot be found), and
    where it comes from when that is not its installed distribution (a copy on PYTHONPATH, a
    package vendored into an image): then the version is the module's own `__version__`."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None, None
    if spec is None:
        return None, None
    where = (list(spec.submodule_search_locations or []) or [spec.origin or ""])[0]
    try:
        dist = importlib.metadata.distribution(name)
        if Path(str(dist.locate_file(name))).resolve() == Path(where).resolve():
            return dist.version, None
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return str(getattr(importlib.import_module(name), "__version__", "unknown")), where
    except Exception as exc:  # a broken copy: what the stage would hit too
        return f"unimportable ({type(exc).__name__}: {exc})", where


def environment(packages: list[str]) -> dict[str, Any]:
    """This process's Python and the versions of `packages` (None: missing); `origins`: where
    those that are not their installed distribution come from."""
    found = {name: version(name) for name in packages}
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "packages": {name: v for name, (v, _) in found.items()},
        "origins": {name: where for name, (_, where) in found.items() if where},
    }


def _fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)


def _marker(root: str, token: str, node: str = "driver") -> str:
    return f"{root.rstrip('/')}/{MARKER}{token}.{node}"


def _mark(paths: dict[str, str], token: str) -> dict[str, str]:
    """Write the driver's marker into each path; 'ok' or why not."""
    found = {}
    for label, path in paths.items():
        try:
            fs, root = _fs(path)
            if "://" not in path:  # on S3 it would create the bucket
                fs.makedirs(root, exist_ok=True)
            fs.pipe_file(_marker(root, token), token.encode())
            found[label] = "ok"
        except Exception as exc:
            found[label] = f"the driver cannot write there ({type(exc).__name__}: {exc})"
    return found


def _node(packages: list[str], paths: dict[str, str], token: str) -> dict[str, Any]:
    """One node's answer: resources, environment, and for each path whether the driver's marker
    is there (the same storage) and this node can write beside it."""
    from ray._private import state  # DeveloperAPI: the only per-node view of free resources

    node_id = ray.get_runtime_context().get_node_id()
    total = state.total_resources_per_node().get(node_id, {})
    seen = {}
    for label, path in paths.items():
        try:
            fs, root = _fs(path)
            if fs.cat_file(_marker(root, token)).decode() != token:
                raise FileNotFoundError(_marker(root, token))
            fs.pipe_file(_marker(root, token, node_id[:12]), token.encode())
            seen[label] = "ok"
        except FileNotFoundError:
            seen[label] = "not found: another filesystem than the driver's"
        except Exception as exc:
            seen[label] = f"{type(exc).__name__}: {exc}"
    return {
        "node_id": node_id,
        "ip": ray.util.get_node_ip_address(),
        "head": "node:__internal_head__" in total,
        "total": total,
        "free": state.available_resources_per_node().get(node_id, {}),
        **environment(packages),
        "paths": seen,
    }


def survey(packages: list[str], paths: dict[str, str], timeout: float = 120) -> dict[str, Any]:
    """Ask every alive node (this process must be a connected driver). `paths`: label -> an
    absolute path or URL, checked as storage the driver and every node share."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex[:12]
    marked = _mark(paths, token)
    shared = {k: v for k, v in paths.items() if marked[k] == "ok"}
    task = ray.remote(num_cpus=0, max_retries=0)(_node)
    alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    refs = {
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(
            packages, shared, token
        ): n
        for n in alive
    }
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    nodes = []
    for ref in ready:
        try:
            nodes.append(ray.get(ref))
        except Exception as exc:  # e.g. the runtime environment failed to set up there
            first = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
            nodes.append({"node_id": refs[ref], "error": first[0][:300]})
    for ref in late:
        ray.cancel(ref, force=True)
        nodes.append({"node_id": refs[ref], "error": f"did not answer within {timeout:.0f} s"})
    for node in nodes:  # the node's marker must be visible to the driver too
        for label, seen in node.get("paths", {}).items():
            fs, root = _fs(paths[label])
            if seen == "ok" and not fs.exists(_marker(root, token, node["node_id"][:12])):
                node["paths"][label] = "its writes are not visible to the driver"
    for path in shared.values():
        fs, root = _fs(path)
        for found in fs.glob(f"{root.rstrip('/')}/{MARKER}{token}.*"):
            fs.rm_file(found)
    return {
        "driver": {**environment(packages), "paths": {k: (paths[k], marked[k]) for k in paths}},
        "nodes": sorted(nodes, key=lambda n: (not n.get("head"), n.get("ip", ""), n["node_id"])),
    }


def main(argv: list[str]) -> int:
    """The probe job: `python -m rayft.cluster.survey '{"packages": [...], "paths": {...}}'`."""
    ask = json.loads(argv[0])
    ray.init(log_to_driver=False)
    try:
        answer = survey(ask["packages"], ask["paths"], ask.get("timeout", 120))
    finally:
        ray.shutdown()
    print(OUTPUT + json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
