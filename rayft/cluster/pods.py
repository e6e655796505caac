"""The Ray pods of a rendered RayJob or RayService: head and worker groups with rayft's image,
environment, volumes (shared storage, the job file's ConfigMap, shared memory) and scheduling."""

from __future__ import annotations

from typing import Any

from rayft.config import JobConfig

MOUNT = "/mnt/rayft"  # shared storage (the PVC) or scratch in every pod
CONFIG_DIR = "/etc/rayft"  # the ConfigMap
CONFIG_FILE = f"{CONFIG_DIR}/job.yaml"
LABEL = "app.kubernetes.io/part-of"


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
    uses_gpu = cfg.serve.gpus_per_replica > 0 if serve else c.use_gpu
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


def ray_cluster(
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
