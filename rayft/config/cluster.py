"""`cluster`: where the job runs, from an embedded Ray to KubeRay manifests."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from rayft.config.section import Section


class K8sConfig(Section):
    namespace: str = Field("default", description="Kubernetes namespace of rendered manifests.")
    image: str = Field("rayft/rayft:0.1.0", description="Container image for head and workers.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Worker node selector.")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Worker tolerations."
    )
    storage: str = Field(
        "pvc:rayft-runs",
        description="Shared storage for run dirs: `pvc:<claim-name>` or an s3:// prefix.",
    )
    head_cpus: int = Field(4, ge=1, description="CPUs of the head pod.")
    head_memory: str = Field("16Gi", description="Memory of the head pod.")
    worker_cpus: int = Field(8, ge=1, description="CPUs per worker pod.")
    worker_memory: str = Field("64Gi", description="Memory per worker pod.")
    ray_version: str = Field(
        "2.60.0",
        description="Ray version inside `image` (KubeRay rayVersion; token auth needs >= 2.52).",
    )
    auth_secret: str | None = Field(
        None,
        description="Secret (key `auth_token`) with the Ray token; None: KubeRay generates one "
        "per Ray cluster. Name one to keep the token stable across RayService upgrades.",
    )
    env_secret: str | None = Field(
        "rayft-env",
        description="Secret whose keys become env vars in every pod (HF_TOKEN, AWS_*, "
        "RAYFT_API_KEY); optional: pods start without it.",
    )
    service_account: str | None = Field(None, description="ServiceAccount of the Ray pods.")
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secrets for pulling `image` from a private registry."
    )
    storage_size: str = Field("500Gi", description="Size of the rendered PVC (pvc: storage).")
    storage_class: str | None = Field(
        None, description="StorageClass of the rendered PVC (None: the cluster default)."
    )
    backoff_limit: int = Field(
        2, ge=0, description="RayJob retries, each on a fresh Ray cluster; train resumes."
    )
    ttl_seconds_after_finished: int = Field(
        3600, ge=0, description="Seconds the finished RayJob's Ray cluster lingers for logs."
    )


class ClusterConfig(Section):
    address: str | None = Field(
        None, description="Ray address of an existing cluster; None starts an embedded local Ray."
    )
    num_workers: int = Field(
        2, ge=1, description="Ray Train workers (one per GPU on GPU clusters)."
    )
    use_gpu: bool = Field(False, description="Give each worker a GPU.")
    gpus_per_node: int = Field(1, ge=1, description="GPUs per node (sizes KubeRay worker groups).")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per training worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement group strategy of the training workers."
    )
    max_failures: int = Field(
        0, ge=-1, description="Worker failures to recover from (-1: unlimited)."
    )
    storage_path: str | None = Field(
        None, description="Checkpoint storage (local dir or s3://); default <run_dir>/checkpoints."
    )
    k8s: K8sConfig = Field(default_factory=K8sConfig, description="KubeRay rendering.")
