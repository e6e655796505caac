"""`rayft k8s render`: one job file -> KubeRay manifests (RayJob for prepare + train, RayService
for serving), as plain dicts written one object per file.

What the rendering decides, so the manifests need no hand edits:
- The job file travels in a ConfigMap, resolved (every default explicit) and with its paths
  rewritten for the cluster. Its name carries a digest of its content, so a changed config is a
  new ConfigMap, hence a changed pod template, hence a RayService upgrade to a fresh cluster
  rather than pods that silently keep reading the old file.
- `cluster.k8s.storage`: `pvc:<claim>` mounts the claim at /mnt/rayft in every pod and puts the
  run directory (and the checkpoints under it) there; `s3://prefix` sends the checkpoints to
  `<prefix>/<name>/checkpoints` and keeps the run directory on pod-local scratch.
- GPU workers: one pod per node, `ceil(num_workers / gpus_per_node)` of them, each with
  `gpus_per_node` GPUs. The head never gets GPUs (and no Ray CPUs): it runs the driver only.
- Ray token authentication is on (`authOptions.mode: token`) in both clusters.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from rayft.cluster.pods import CONFIG_FILE, LABEL, MOUNT, ray_cluster
from rayft.config import JobConfig, dump_config
from rayft.errors import RayftError

IMAGE_PROJECT = "/opt/rayft"  # the project copy in the image (docker/Dockerfile: WORKDIR)
APP_IMPORT_PATH = "rayft.serving.app:app_builder"


class RenderError(RayftError):
    """A job file that cannot be rendered into KubeRay manifests."""


# --------------------------------------------------------------------------- sizing


def gpu_nodes(cfg: JobConfig) -> int:
    """Worker pods of the training cluster: nodes x GPUs covers the training workers."""
    c = cfg.cluster
    if c.use_gpu:
        return math.ceil(c.num_workers / c.gpus_per_node)
    # CPU: the Ray Train workers plus two CPUs for the Ray Data tasks that feed them.
    return math.ceil((c.num_workers * c.cpus_per_worker + 2) / c.k8s.worker_cpus)


def serve_nodes(cfg: JobConfig) -> tuple[int, int]:
    """(min, max) worker pods of the serving cluster from the replica bounds."""
    s, c = cfg.serve, cfg.cluster
    engines = 1 + len(s.models)
    lo, hi = (
        (s.autoscaling.min_replicas, s.autoscaling.max_replicas)
        if s.autoscaling
        else (s.num_replicas, s.num_replicas)
    )
    gpus = s.gpus_per_replica
    if gpus > c.gpus_per_node:
        raise RenderError(
            f"serve.gpus_per_replica={gpus:g} exceeds cluster.gpus_per_node={c.gpus_per_node}: "
            "a replica cannot span nodes; raise gpus_per_node or lower gpus_per_replica"
        )
    if gpus > 0:
        per_node = max(1, math.floor(c.gpus_per_node / gpus))
    else:
        per_node = max(1, math.floor(c.k8s.worker_cpus / max(s.cpus_per_replica, 0.001)))
    return (math.ceil(engines * lo / per_node), max(1, math.ceil(engines * hi / per_node)))


# --------------------------------------------------------------------------- the job file


def object_name(cfg: JobConfig) -> str:
    """`cfg.name` as a DNS-1123 label short enough for KubeRay's derived names."""
    name = re.sub(r"[^a-z0-9-]+", "-", cfg.name.lower()).strip("-")
    if not name or len(name) > 40:
        raise RenderError(
            f"name {cfg.name!r}: KubeRay object names are built from it and need 1-40 "
            "characters of a-z, 0-9 and '-'; set a shorter `name` in the job file"
        )
    return name


def cluster_config(cfg: JobConfig) -> JobConfig:
    """The config as the pods see it: run dir and checkpoints on the cluster's storage."""
    k = cfg.cluster.k8s
    run_dir = f"{MOUNT}/runs/{object_name(cfg)}"
    storage_path = cfg.cluster.storage_path
    if k.storage.startswith("s3://"):
        if not (storage_path or "").startswith("s3://"):
            storage_path = f"{k.storage.rstrip('/')}/{object_name(cfg)}/checkpoints"
    elif k.storage.startswith("pvc:"):
        if storage_path and "://" not in storage_path:
            storage_path = None  # a local dir would be pod-local; <run_dir>/checkpoints is shared
    else:
        raise RenderError(
            f"cluster.k8s.storage {k.storage!r}: use `pvc:<claim-name>` or an s3:// prefix"
        )

    def moved(path: str) -> str:
        """Paths under the old run dir follow it; others are left as written."""
        old = PurePosixPath(cfg.run_dir)
        try:
            return str(PurePosixPath(run_dir) / PurePosixPath(path).relative_to(old))
        except ValueError:
            return path

    def in_image(path: str) -> str:
        """Relative input files resolve against the project copy in the image."""
        if "://" in path or PurePosixPath(path).is_absolute():
            return path
        return str(PurePosixPath(IMAGE_PROJECT) / path)

    data = cfg.model_dump(mode="json")
    data["run_dir"] = run_dir
    for key in ("train_files", "validation_files", "test_files"):
        data["data"][key] = [in_image(f) for f in data["data"][key]]
    data["cluster"]["address"] = None  # inside the cluster Ray sets RAY_ADDRESS
    data["cluster"]["storage_path"] = storage_path
    data["serve"]["host"] = "0.0.0.0"  # the Serve proxy must be reachable from the Service
    data["serve"]["adapters"] = {n: moved(p) for n, p in cfg.serve.adapters.items()}
    if cfg.serve.adapter_root:
        data["serve"]["adapter_root"] = moved(cfg.serve.adapter_root)
    return JobConfig.model_validate(data)


def config_text(cfg: JobConfig, source: str) -> str:
    return (
        f"# {source}, resolved by `rayft k8s render` (defaults explicit, paths rewritten for "
        "the cluster)\n" + dump_config(cluster_config(cfg))
    )


def _meta(cfg: JobConfig, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": cfg.cluster.k8s.namespace,
        "labels": {
            LABEL: "rayft",
            "app.kubernetes.io/name": object_name(cfg),
            "app.kubernetes.io/component": component,
        },
    }


# --------------------------------------------------------------------------- objects


def configmap(cfg: JobConfig, source: str) -> dict[str, Any]:
    text = config_text(cfg, source)
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(cfg, f"{object_name(cfg)}-config-{digest}", "config"),
        "data": {"job.yaml": text},
    }


def pvc(cfg: JobConfig) -> dict[str, Any] | None:
    k = cfg.cluster.k8s
    if not k.storage.startswith("pvc:"):
        return None
    spec: dict[str, Any] = {
        # Head and workers on different nodes read and write the same run directory.
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": k.storage_size}},
    }
    if k.storage_class:
        spec["storageClassName"] = k.storage_class
    meta = _meta(cfg, k.storage[4:], "storage")
    meta["labels"].pop("app.kubernetes.io/name")  # shared by every run that names the claim
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def rayjob(cfg: JobConfig, configmap_name: str) -> dict[str, Any]:
    k = cfg.cluster.k8s
    n = gpu_nodes(cfg)
    # --resume: a retry (backoffLimit) continues from the last checkpoint instead of failing on
    # the checkpoints its first attempt left; a first attempt starts fresh.
    entrypoint = f"rayft prepare {CONFIG_FILE} && rayft train {CONFIG_FILE} --resume"
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _meta(cfg, f"{object_name(cfg)}-train", "train"),
        "spec": {
            "entrypoint": entrypoint,
            # K8sJobMode: a submitter Job tails the driver's logs, so `kubectl logs job/...`
            # shows training progress and the Job's status is the run's.
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": k.ttl_seconds_after_finished,
            "backoffLimit": k.backoff_limit,
            "rayClusterSpec": ray_cluster(cfg, configmap_name, (n, n, n), serve=False),
        },
    }


def serve_config(cfg: JobConfig) -> dict[str, Any]:
    """Ray Serve config (serveConfigV2) of the rayft app, deployment options restated so an
    operator sees (and may edit) replica bounds and resources in the RayService."""
    s = cfg.serve
    scaling: dict[str, Any] = (
        {"autoscaling_config": s.autoscaling.model_dump()}
        if s.autoscaling
        else {"num_replicas": s.num_replicas}
    )
    engines = ["base", *s.models]
    deployments = [
        {
            "name": f"engine-{name}",
            **scaling,
            "max_ongoing_requests": s.max_ongoing_requests,
            "ray_actor_options": {
                "num_cpus": s.cpus_per_replica,
                "num_gpus": s.gpus_per_replica,
            },
        }
        for name in engines
    ]
    return {
        "http_options": {"host": "0.0.0.0", "port": s.port},
        "applications": [
            {
                "name": "rayft",
                "route_prefix": "/",
                "import_path": APP_IMPORT_PATH,
                "args": {"config": CONFIG_FILE, "overrides": []},
                "runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
                "deployments": deployments,
            }
        ],
    }


def rayservice(cfg: JobConfig, configmap_name: str) -> dict[str, Any]:
    lo, hi = serve_nodes(cfg)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _meta(cfg, f"{object_name(cfg)}-serve", "serve"),
        "spec": {
            # A changed cluster (new image, new ConfigMap) comes up beside the old one; traffic
            # moves once the new app is healthy.
            "upgradeStrategy": {"type": "NewCluster"},
            "serveConfigV2": to_yaml(serve_config(cfg)),
            "rayClusterConfig": ray_cluster(cfg, configmap_name, (lo, lo, hi), serve=True),
        },
    }


def manifests(cfg: JobConfig, source: str) -> dict[str, dict[str, Any]]:
    """File name -> object, in the order they are applied."""
    cm = configmap(cfg, source)
    out = {"configmap.yaml": cm}
    claim = pvc(cfg)
    if claim:
        out["pvc.yaml"] = claim
    out["rayjob.yaml"] = rayjob(cfg, cm["metadata"]["name"])
    out["rayservice.yaml"] = rayservice(cfg, cm["metadata"]["name"])
    return out


def kustomization(files: list[str]) -> dict[str, Any]:
    """Training objects only: the RayService needs the adapter that the RayJob writes."""
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f for f in files if f != "rayservice.yaml"],
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the job file, serveConfigV2) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=4096)


def header(source: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    sets = "".join(f" --set {o}" for o in overrides)
    return (
        f"# rendered by `rayft k8s render {source}{sets}` - do not edit; change the job file "
        "and re-render\n"
    )


def render(
    cfg: JobConfig,
    out: str | Path,
    config_path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> list[Path]:
    """Write the manifests for `cfg` into `out`, one object per file; return the paths."""
    source = Path(config_path).as_posix() if config_path else "defaults"
    objects = manifests(cfg, source)
    objects["kustomization.yaml"] = kustomization(list(objects))
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RenderError(f"--out {out}: cannot create the directory ({e.strerror})") from e
    top = header(source, overrides)
    paths = []
    for name, obj in objects.items():
        path = out / name
        path.write_text(top + to_yaml(obj))
        paths.append(path)
    return paths
