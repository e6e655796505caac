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

from rayft.config import JobConfig, dump_config
from rayft.errors import RayftError

MOUNT = "/mnt/rayft"  # shared storage (the PVC) or scratch in every pod
CONFIG_DIR = "/etc/rayft"  # the ConfigMap
CONFIG_FILE = f"{CONFIG_DIR}/job.yaml"
IMAGE_PROJECT = "/opt/rayft"  # the project copy in the image (docker/Dockerfile: WORKDIR)
APP_IMPORT_PATH = "rayft.serving.app:app_builder"
LABEL = "app.kubernetes.io/part-of"


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


def serve_gpus_per_replica(cfg: JobConfig) -> float:
    """GPUs of one engine replica: vLLM needs at least one even when the config says 0."""
    s = cfg.serve
    return max(s.gpus_per_replica, 1.0) if s.engine == "vllm" else s.gpus_per_replica


def serve_nodes(cfg: JobConfig) -> tuple[int, int]:
    """(min, max) worker pods of the serving cluster from the replica bounds."""
    s, c = cfg.serve, cfg.cluster
    engines = 1 + len(s.models)
    lo, hi = (
        (s.autoscaling.min_replicas, s.autoscaling.max_replicas)
        if s.autoscaling
        else (s.num_replicas, s.num_replicas)
    )
    gpus = serve_gpus_per_replica(cfg)
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


# --------------------------------------------------------------------------- pods


def _volumes(cfg: JobConfig, configmap: str) -> tuple[list[dict], list[dict]]:
    storage = cfg.cluster.k8s.storage
    run_volume: dict[str, Any] = (
        {"name": "rayft-storage", "persistentVolumeClaim": {"claimName": storage[4:]}}
        if storage.startswith("pvc:")
        else {"name": "rayft-storage", "emptyDir": {}}
    )
    volumes = [
        run_volume,
        {"name": "rayft-config", "configMap": {"name": configmap}},
        # NCCL and the PyTorch data loaders use shared memory; the container default is 64 MiB.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts = [
        {"name": "rayft-storage", "mountPath": MOUNT},
        {"name": "rayft-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    return volumes, mounts


def _env(cfg: JobConfig) -> tuple[list[dict], list[dict]]:
    env = [
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
        {"name": "HF_HOME", "value": f"{MOUNT}/hf-cache"},  # shared: each pod downloads once
    ]
    k = cfg.cluster.k8s
    env_from = [{"secretRef": {"name": k.env_secret, "optional": True}}] if k.env_secret else []
    return env, env_from


def _pod_template(cfg: JobConfig, configmap: str, container: dict, worker: bool) -> dict[str, Any]:
    """The pod of a head or worker group: rayft's image, env, volumes and scheduling."""
    k = cfg.cluster.k8s
    volumes, mounts = _volumes(cfg, configmap)
    env, env_from = _env(cfg)
    body: dict[str, Any] = {
        "image": k.image,
        "imagePullPolicy": "IfNotPresent",
        **container,
        "env": env,
    }
    if env_from:
        body["envFrom"] = env_from
    body["volumeMounts"] = mounts
    spec: dict[str, Any] = {"containers": [body], "volumes": volumes}
    if k.service_account:
        spec["serviceAccountName"] = k.service_account
    if k.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in k.image_pull_secrets]
    if worker and k.node_selector:
        spec["nodeSelector"] = dict(k.node_selector)
    if worker and k.tolerations:
        spec["tolerations"] = [dict(t) for t in k.tolerations]
    return {"metadata": {"labels": {LABEL: "rayft"}}, "spec": spec}


def _resources(cpus: int, memory: str, gpus: int = 0) -> dict[str, Any]:
    amount = {"cpu": str(cpus), "memory": memory}
    limits = {**amount, "nvidia.com/gpu": str(gpus)} if gpus else dict(amount)
    return {"requests": dict(limits), "limits": limits}


def _head(cfg: JobConfig, configmap: str, serve: bool) -> dict[str, Any]:
    k = cfg.cluster.k8s
    ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    if serve:
        ports.append({"containerPort": cfg.serve.port, "name": "serve"})
    container = {
        "name": "ray-head",
        "ports": ports,
        "resources": _resources(k.head_cpus, k.head_memory),
    }
    return {
        # num-cpus 0: no tasks or actors on the head, it runs the driver and Ray's own services.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0", "num-gpus": "0"},
        "template": _pod_template(cfg, configmap, container, worker=False),
    }


def _workers(
    cfg: JobConfig, configmap: str, replicas: tuple[int, int, int], serve: bool
) -> dict[str, Any]:
    k, c = cfg.cluster.k8s, cfg.cluster
    uses_gpu = serve_gpus_per_replica(cfg) > 0 if serve else c.use_gpu
    gpus = c.gpus_per_node if uses_gpu else 0
    container = {
        "name": "ray-worker",
        "resources": _resources(k.worker_cpus, k.worker_memory, gpus),
    }
    if serve:
        container["ports"] = [{"containerPort": cfg.serve.port, "name": "serve"}]
    lo, n, hi = replicas
    return {
        "groupName": "gpu-workers" if gpus else "cpu-workers",
        "replicas": n,
        "minReplicas": lo,
        "maxReplicas": hi,
        "rayStartParams": {},
        "template": _pod_template(cfg, configmap, container, worker=True),
    }


def _ray_cluster(
    cfg: JobConfig, configmap: str, replicas: tuple[int, int, int], serve: bool
) -> dict[str, Any]:
    k = cfg.cluster.k8s
    auth: dict[str, Any] = {"mode": "token"}
    if k.auth_secret:
        auth["secretName"] = k.auth_secret
    spec: dict[str, Any] = {"rayVersion": k.ray_version, "authOptions": auth}
    if serve and replicas[0] != replicas[2]:
        spec["enableInTreeAutoscaling"] = True
    spec["headGroupSpec"] = _head(cfg, configmap, serve)
    spec["workerGroupSpecs"] = [_workers(cfg, configmap, replicas, serve)]
    return spec


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
            "rayClusterSpec": _ray_cluster(cfg, configmap_name, (n, n, n), serve=False),
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
                "num_gpus": serve_gpus_per_replica(cfg),
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
            "rayClusterConfig": _ray_cluster(cfg, configmap_name, (lo, lo, hi), serve=True),
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
