"""Pre-flight: can this stage run on that cluster? Checked before anything is submitted or
started on an existing Ray cluster (`rayft submit`, a stage with `--address`, `rayft cluster
check`), from what rayft.cluster.survey found there.

Three questions, each refused with the numbers and the fix:
- resources: the training workers' placement group, plus a CPU for the Ray Data tasks that
  feed them (without it the workers hold every CPU and wait forever for data: the silent hang
  the embedded Ray avoids by over-provisioning, see connect.local_cpus); eval's and serve's
  replicas. More than the cluster has is refused (a warning with `cluster.autoscaling`); more
  than is free now is a warning (the stage waits for other work to end).
- packages: on every node and in the driver, what the stage imports: missing, or outside
  rayft's own requirements, or Ray or Python of another minor version than the driver's is
  refused; other version differences are warnings.
- storage: `run_dir` and `cluster.storage_path` must be the same storage for the driver and
  every node (each writes there; a marker file written by one and read by the others).
"""

from __future__ import annotations

import importlib.metadata
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rayft.config import JobConfig
from rayft.errors import RayftError

STAGES = ("prepare", "train", "eval", "serve", "merge", "export")
PIPELINE = ("prepare", "train", "eval")  # what `quickstart` runs and `cluster check` checks
STRICT = ("ray", "python")  # another minor version here breaks pickling between processes


@dataclass
class Demand:
    """`count` bundles of `bundle` placed by `strategy`, plus `reserve` free on some node."""

    unit: str  # "training worker", for messages
    bundle: dict[str, float]
    count: int
    strategy: str = "PACK"
    reserve: dict[str, float] = field(default_factory=dict)
    reserve_for: str = ""
    key: str = ""  # the config key of `count`

    def __str__(self) -> str:
        return f"{self.count} {self.unit}{'s' * (self.count != 1)}"


@dataclass
class Verdict:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # what was found, printed either way

    def settle(self, what: str) -> None:
        """Print the findings and warnings; raise when something is refused."""
        for line in self.lines:
            print(f"[rayft preflight] {line}", flush=True)
        for w in self.warnings:
            print(f"[rayft preflight] warning: {w}", flush=True)
        if self.errors:
            raise RayftError(
                f"pre-flight refused {what}:\n" + "\n".join(f"  - {e}" for e in self.errors)
            )


# --------------------------------------------------------------------------- what a stage needs


def stages_of(stage: str) -> tuple[str, ...]:
    """The stages a command runs (`quickstart` runs three); () for commands that need no check."""
    if stage == "quickstart":
        return PIPELINE
    return (stage,) if stage in STAGES else ()


def packages(cfg: JobConfig, stage: str) -> list[str]:
    """What `stage` imports on the cluster's nodes."""
    t, models = cfg.training, ["torch", "transformers", "peft"]
    deepspeed = t.deepspeed.zero_stage > 0 or t.deepspeed.raw_config is not None
    return {
        "prepare": ["ray", "pyarrow", "transformers"],
        "train": ["ray", "pyarrow", *models, "trl"]
        + ["deepspeed"] * deepspeed
        + ["bitsandbytes"] * (t.method == "qlora"),
        "eval": ["ray", "pyarrow", *models],
        "serve": ["ray", *models] + ["vllm"] * (cfg.serve.engine == "vllm"),
        "export": ["ray", *models, "gguf"],
    }.get(stage, ["ray", *models])


def demands(cfg: JobConfig, stage: str) -> list[Demand]:
    c, gpu, s = cfg.cluster, 1.0 if cfg.cluster.use_gpu else 0.0, cfg.serve
    if stage == "prepare":
        return [Demand("task", {}, 0, reserve={"CPU": 1.0}, reserve_for="Ray Data's tasks")]
    if stage == "train":
        bundle = {"CPU": c.cpus_per_worker, "GPU": gpu}
        data = "the Ray Data tasks that feed them"
        return [Demand("training worker", bundle, c.num_workers, c.placement_strategy,
                       {"CPU": 1.0}, data, "cluster.num_workers")]  # fmt: skip
    if stage == "eval":
        bundle = {"CPU": 1.0, "GPU": gpu}  # rayft.evaluation.generate's actors
        return [Demand("eval replica", bundle, cfg.eval.num_replicas, key="eval.num_replicas")]
    if stage == "serve":
        bundle = {"CPU": s.cpus_per_replica, "GPU": s.gpus_per_replica}
        n = s.autoscaling.min_replicas if s.autoscaling else s.num_replicas
        key = "serve.autoscaling.min_replicas" if s.autoscaling else "serve.num_replicas"
        return [Demand("serve replica", bundle, n, key=key)]
    return []  # merge and export run in the driver


# --------------------------------------------------------------------------- resources


def _capacity(free: dict[str, float], bundle: dict[str, float]) -> float:
    """How many bundles fit in `free` (inf when the bundle asks for nothing)."""
    asks = [(r, a) for r, a in bundle.items() if a > 0]
    return min((math.floor(free.get(r, 0.0) / a + 1e-9) for r, a in asks), default=math.inf)


def fits(d: Demand, nodes: list[dict[str, float]]) -> bool:
    """Whether `d` fits in `nodes` (resources per node). The bundles are identical, so counting
    how many each node holds decides it; the reserve is tried on every node in turn."""
    options = [nodes] if not d.reserve else [
        [{r: v - d.reserve.get(r, 0.0) for r, v in n.items()} if i == j else n
         for i, n in enumerate(nodes)]
        for j, n in enumerate(nodes)
        if all(n.get(r, 0.0) >= a - 1e-9 for r, a in d.reserve.items())
    ]  # fmt: skip
    for room in options:
        held = [_capacity(n, d.bundle) for n in room]
        if d.strategy == "STRICT_PACK":
            ok = any(h >= d.count for h in held)
        elif d.strategy == "STRICT_SPREAD":
            ok = sum(1 for h in held if h >= 1) >= d.count
        else:
            ok = sum(held) >= d.count
        if ok:
            return True
    return False


def _need(d: Demand) -> str:
    parts = []
    for r in ("CPU", "GPU"):
        per, extra = d.bundle.get(r, 0.0), d.reserve.get(r, 0.0)
        terms = [f"{d} x {per:g}"] if per * d.count else []
        terms += [f"{extra:g} for {d.reserve_for}"] if extra else []
        if terms:
            n = per * d.count + extra
            parts.append(f"{n:g} {r}{'s' * (n != 1)} ({' + '.join(terms)})")
    return " and ".join(parts)


def _has(nodes: list[dict[str, Any]], key: str) -> str:
    return ", ".join(
        f"{n['ip']}{' (head)' if n.get('head') else ''} "
        + " ".join(f"{n[key].get(r, 0.0):g} {r}" for r in ("CPU", "GPU") if n["total"].get(r))
        for n in nodes
    )


def _fixes(cfg: JobConfig, d: Demand, room: list[dict[str, float]]) -> str:
    """Changes of the config that fit, where some do."""
    fixes = []
    fewer = next((n for n in range(d.count - 1, 0, -1) if fits(replace(d, count=n), room)), None)
    if fewer and d.key:
        fixes.append(f"--set {d.key}={fewer}")
    if d.key == "cluster.num_workers":
        quarters = range(math.ceil(d.bundle["CPU"] * 4) - 1, 0, -1)  # quarter CPUs, fewer
        cpus = next(
            (q / 4 for q in quarters if fits(replace(d, bundle={**d.bundle, "CPU": q / 4}), room)),
            None,
        )
        if cpus:
            fixes.append(f"--set cluster.cpus_per_worker={cpus:g}")
    fixes.append("add nodes (cluster.autoscaling: true where the cluster adds them itself)")
    return "; or ".join(fixes)


def judge_resources(cfg: JobConfig, stage: str, nodes: list[dict[str, Any]], v: Verdict) -> None:
    up = [n for n in nodes if "total" in n]
    total, free = [n["total"] for n in up], [n["free"] for n in up]
    for d in demands(cfg, stage):
        if fits(d, free):
            continue
        if fits(d, total):
            v.warnings.append(
                f"{stage} needs {_need(d)}, more than is free now ({_has(up, 'free')}): it "
                "waits until other work on the cluster frees them (`rayft cluster status`)"
            )
            continue
        why = f"{stage} needs {_need(d)}; the cluster has {_has(up, 'total')}"
        if d.count and max((_capacity(t, d.bundle) for t in total), default=0) < 1:
            why += f": no node can hold a single {d.unit}"
        elif d.strategy == "STRICT_SPREAD" and d.count > len(up):
            why += f": STRICT_SPREAD puts each {d.unit} on a node of its own"
        elif d.reserve and fits(replace(d, reserve={}), total):
            why += (
                f". The {d.unit}s would hold every CPU and {d.reserve_for} would wait for one "
                "forever: the stage would hang without a step"
            )
        if cfg.cluster.autoscaling:
            v.warnings.append(
                f"{why}; cluster.autoscaling: waiting for the autoscaler to add nodes"
            )
        else:
            v.errors.append(f"{why}. Fix: {_fixes(cfg, d, total)}")


# --------------------------------------------------------------------------- packages


def requirements() -> dict[str, Any]:
    """rayft's own version bounds (name -> SpecifierSet, 'python' included), as installed."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    try:
        meta = importlib.metadata.metadata("rayft")
        reqs = [Requirement(r) for r in importlib.metadata.requires("rayft") or []]
    except importlib.metadata.PackageNotFoundError:  # a source tree on PYTHONPATH
        return {}
    bounds = {r.name.lower(): r.specifier for r in reqs if r.marker is None}
    bounds["python"] = SpecifierSet(meta.get("Requires-Python") or "")
    return bounds


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def _version(env: dict[str, Any], name: str) -> str | None:
    return env["python"] if name == "python" else env["packages"].get(name)


def judge_packages(
    names: list[str], survey: dict[str, Any], client: dict[str, Any] | None, v: Verdict
) -> None:
    """Every node and the driver against rayft's bounds and the driver's versions; `client`:
    the submitting machine's environment, when it is not the driver (warnings only)."""
    from packaging.version import InvalidVersion, Version

    bounds, ref = requirements(), survey["driver"]
    where = [("the driver", ref)] + [
        (f"node {n['ip']}{' (head)' if n.get('head') else ''} {n['node_id'][:8]}", n)
        for n in survey["nodes"]
        if "packages" in n
    ]
    problems: dict[tuple[str, str], list[str]] = {}
    for name in ["python", *names]:
        want = _version(ref, name)
        for place, env in where:
            have, origin = _version(env, name), env.get("origins", {}).get(name)
            at = f"{place} (imported from {origin})" if origin else place
            try:
                bad = have is not None and name in bounds and Version(have) not in bounds[name]
            except InvalidVersion:
                bad = True
            if have is None or bad:
                why = (
                    "missing" if have is None else f"{have}, outside rayft's {name}{bounds[name]},"
                )
                problems.setdefault((name, why), []).append(at)
            elif want and _minor(have) != _minor(want):
                if name in STRICT:
                    problems.setdefault((name, f"{have}, the driver's {want},"), []).append(at)
                else:
                    v.warnings.append(f"{name} {have} on {at}, {want} in the driver")
    for (name, what), places in problems.items():
        pin = _version(ref, name)
        if name == "python":
            fix = "one Python on every node and in the driver (cluster.python names the driver's)"
        elif "imported from" in " ".join(places):
            fix = (
                f"remove that copy from the node's import path (PYTHONPATH), which hides the "
                f"installed {name}" + (f"; the driver has {name}=={pin}" if pin else "")
            )
        elif pin and "driver" not in " ".join(places):
            fix = (
                f"`pip install '{name}=={pin}'` (the driver's) in those nodes' image or "
                "environment, or add it to cluster.runtime_env.pip"
            )
        else:
            fix = f"install {name}{bounds.get(name, '')} on every node and in the driver"
        v.errors.append(f"{name} {what} on {', '.join(places)}. Fix: {fix}")
    differ = [
        f"{k} {_version(client, k)} here, {_version(ref, k)} on the cluster"
        for k in ["python", *names]
        if client and _version(client, k) and _minor(_version(client, k) or "")
        != _minor(_version(ref, k) or "")
    ]  # fmt: skip
    if differ:
        v.warnings.append(
            "this machine and the cluster differ (what it writes is read here): "
            + "; ".join(differ)
        )


# --------------------------------------------------------------------------- storage


def paths(cfg: JobConfig, stages: tuple[str, ...], submitted: bool) -> dict[str, str]:
    """The storage each node must share with the driver, by config key. A submitted stage runs
    in a temporary copy of the project: a relative path there reaches neither the user nor the
    other nodes, so it is refused; under `--address` it resolves here, on the driver."""
    if "://" in cfg.run_dir:
        raise RayftError(
            f"run_dir={cfg.run_dir}: the stages write the run dir as files; use a path every "
            "node mounts (NFS, a PVC), and cluster.storage_path for s3:// checkpoints"
        )
    found = {"run_dir": cfg.run_dir}
    if cfg.cluster.storage_path and {"train"} & set(stages):
        found["cluster.storage_path"] = cfg.cluster.storage_path
    for key, path in list(found.items()):
        if "://" in path or Path(path).is_absolute():
            continue
        if submitted:
            raise RayftError(
                f"{key}={path} is relative: a submitted stage would write into its job's "
                "temporary copy of the project, which neither you nor the other nodes see. "
                f"Use an absolute path on storage every node shares (NFS, a PVC mount)"
                + (" or an s3:// prefix" if key != "run_dir" else "")
                + f", e.g. --set {key}=/mnt/shared/{cfg.name}"
            )
        found[key] = str(Path(path).resolve())
    return found


def judge_paths(survey: dict[str, Any], v: Verdict) -> None:
    for key, (path, state) in survey["driver"]["paths"].items():
        if state != "ok":
            v.errors.append(f"{key}={path}: {state}")
            continue
        apart = [
            f"{n['ip']} {n['node_id'][:8]} ({n['paths'][key]})"
            for n in survey["nodes"]
            if key in n.get("paths", {}) and n["paths"][key] != "ok"
        ]
        if apart:
            v.errors.append(
                f"{key}={path} is not storage the driver and every node share: "
                + "; ".join(apart)
                + ". Every node reads and writes the run there: use a path that all of them "
                "mount (NFS, a PVC)" + (", or an s3:// prefix" if key != "run_dir" else "")
            )


# --------------------------------------------------------------------------- the whole check


def request(cfg: JobConfig, stages: tuple[str, ...], submitted: bool) -> dict[str, Any]:
    """What the survey must look at for `stages`."""
    names = sorted({p for s in stages for p in packages(cfg, s)})
    timeout = 900 if {"pip", "uv"} & set(cfg.cluster.runtime_env) else 120  # pip installs
    return {"packages": names, "paths": paths(cfg, stages, submitted), "timeout": timeout}


def judge(
    cfg: JobConfig,
    stages: tuple[str, ...],
    survey: dict[str, Any],
    client: dict[str, Any] | None = None,
) -> Verdict:
    v = Verdict()
    nodes = survey["nodes"]
    for n in nodes:
        if "error" in n:
            v.errors.append(f"node {n['node_id'][:8]} did not answer the pre-flight: {n['error']}")
            continue
        have = [f"{n['free'].get(r, 0):g}/{n['total'][r]:g} {r}" for r in ("CPU", "GPU")
                if r in n["total"]]  # fmt: skip
        v.lines.append(
            f"node {n['ip']}{' (head)' if n['head'] else ''} {n['node_id'][:8]}: "
            f"{', '.join(have)} free, {n['free'].get('memory', 0) / 2**30:.1f} GiB memory, "
            f"Python {n['python']}, ray {n['packages'].get('ray')}"
        )
    for stage in stages:
        judge_resources(cfg, stage, nodes, v)
    judge_packages(sorted({p for s in stages for p in packages(cfg, s)}), survey, client, v)
    judge_paths(survey, v)
    return v


def check_connected(cfg: JobConfig, stages: tuple[str, ...], what: str) -> None:
    """The pre-flight from a driver connected to the cluster (`--address`): refuse or print."""
    from rayft.cluster.survey import survey

    if not stages:
        return
    ask = request(cfg, stages, submitted=False)
    found = survey(ask["packages"], ask["paths"], ask["timeout"])
    judge(cfg, stages, found).settle(what)
