"""`cluster`: where the job runs, from an embedded Ray to KubeRay manifests."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from rayft.config.section import Section

# Set by every stage's own ray.init (rayft.cluster.connect); Ray refuses a submitted job whose
# runtime_env sets one of them too, so `cluster.runtime_env.env_vars` may not. Train V2 patches
# print() in its workers to also log each line through a logger that goes to the console too:
# with Ray's own stdout capture every `[rayft train]` line came twice.
STAGE_ENV_VARS = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# rayft sets working_dir and py_modules itself; conda and container envs replace the Python
# that runs the stage, which `cluster.python` names instead.
RUNTIME_ENV_KEYS = ("pip", "uv", "env_vars")


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
    gpu_type: str | None = Field(
        None,
        description="The GPU the workers get (`rayft plan` names them, e.g. H100-80GB): what "
        "the pre-launch plan check sizes the job for (default: the plan's default GPU).",
    )
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
    stall_timeout: float = Field(
        300,
        ge=0,
        description="Seconds without progress (no training step, no data block, no eval batch) "
        "before a stage stops with a diagnosis of what Ray is waiting for; 0: never.",
    )
    autoscaling: bool = Field(
        False,
        description="The cluster adds nodes on demand (KubeRay autoscaler, cluster launcher): "
        "missing resources are a warning, and a stalled stage keeps waiting for nodes.",
    )
    python: str = Field(
        "python",
        description="Interpreter that runs a submitted stage (and its pre-flight) on the "
        "cluster, e.g. /opt/venv/bin/python when the cluster runs from a virtualenv.",
    )
    runtime_env: dict[str, Any] = Field(
        default_factory=dict,
        description="Ray runtime environment for submitted stages on clusters without rayft's "
        "dependencies: `pip` or `uv` (packages), `env_vars`; the pre-flight checks versions "
        "inside it.",
    )
    k8s: K8sConfig = Field(default_factory=K8sConfig, description="KubeRay rendering.")

    @field_validator("runtime_env")
    @classmethod
    def _runtime_env(cls, env: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(env) - set(RUNTIME_ENV_KEYS))
        if unknown:
            raise ValueError(
                f"cluster.runtime_env: {', '.join(unknown)} not supported; use "
                f"{', '.join(RUNTIME_ENV_KEYS)} (rayft uploads the project and its package "
                "itself; for a conda env or a container, start the cluster from it and set "
                "cluster.python to its interpreter)"
            )
        if "pip" in env and "uv" in env:
            raise ValueError("cluster.runtime_env: give either pip or uv, not both")
        for key in ("pip", "uv"):
            packages = env.get(key)
            if packages is not None and not (
                isinstance(packages, list) and all(isinstance(p, str) for p in packages)
            ):
                raise ValueError(
                    f"cluster.runtime_env.{key}: a list of requirement strings, e.g. "
                    f"[peft==0.18.1, trl==1.10.0]; got {packages!r}"
                )
        env_vars = env.get("env_vars", {})
        if not isinstance(env_vars, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()
        ):
            raise ValueError(
                'cluster.runtime_env.env_vars: a mapping of names to strings (quote numbers: "1")'
            )
        clash = sorted(set(env_vars) & set(STAGE_ENV_VARS))
        if clash:
            raise ValueError(
                f"cluster.runtime_env.env_vars: {', '.join(clash)} is set by rayft's stages "
                "themselves (Ray refuses a job that sets it twice); remove it"
            )
        return env
