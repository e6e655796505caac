"""KubeRay rendering: manifests validate against the KubeRay CRD schemas, are sized from the
cluster section, carry token auth and storage, and the checked-in k8s/ stays in sync."""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from rayft.cli import main
from rayft.cluster import k8s
from rayft.config import JobConfig, K8sConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "tests" / "data" / "kuberay-crds"  # vendored: see its README.md
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
RENDERED = ROOT / "k8s" / "rendered"


# --------------------------------------------------------------------------- validation


def _strict(schema: object) -> object:
    """The CRD schema as the API server applies it with strict field validation (kubectl's
    default): an object schema lists every field it allows, so unknown fields are errors."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def validator(kind: str) -> jsonschema.Draft7Validator:
    plural = {"RayJob": "rayjobs", "RayService": "rayservices"}[kind]
    path = CRDS / f"ray.io_{plural}.yaml"
    if not path.is_file():
        # Fail, never skip: without the schema the manifests would go unchecked.
        pytest.fail(f"{path} is missing; restore it as {CRDS / 'README.md'} describes")
    text = path.read_text()
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))


def errors(obj: dict) -> list[str]:
    found = validator(obj["kind"]).iter_errors(obj)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in found]


def render(tmp_path: Path, config: str | Path, *sets: str) -> dict[str, dict]:
    cfg = load_config(config, list(sets))
    paths = k8s.render(cfg, tmp_path / "out", config_path=config, overrides=list(sets))
    return {p.name: yaml.safe_load(p.read_text()) for p in paths}


def pods(cluster: dict) -> list[dict]:
    head = cluster["headGroupSpec"]["template"]["spec"]
    return [head, *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]


def resources(pod: dict) -> dict:
    return pod["containers"][0]["resources"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_rendered_objects_validate_against_kuberay_crds(tmp_path: Path, config: Path) -> None:
    for storage in ("pvc:rayft-runs", "s3://bucket/rayft"):
        objs = render(tmp_path, config, f"cluster.k8s.storage={storage}")
        for name in ("rayjob.yaml", "rayservice.yaml"):
            assert errors(objs[name]) == [], f"{config.name} ({storage}) {name}"
        cm = objs["configmap.yaml"]
        assert cm["apiVersion"] == "v1" and cm["kind"] == "ConfigMap"
        assert re.fullmatch(r"[a-z0-9-]{1,63}", cm["metadata"]["name"])
        assert all(isinstance(v, str) for v in cm["data"].values())


def test_validator_rejects_broken_manifests(tmp_path: Path) -> None:
    """The schema check is not vacuous: typos, wrong types, missing and bad values fail."""
    good = render(tmp_path, ROOT / "configs/llama-3-70b-lora-zero3.yaml")["rayjob.yaml"]
    assert errors(good) == []

    def broken(edit) -> list[str]:
        obj = copy.deepcopy(good)
        edit(obj)
        return errors(obj)

    spec = "spec"
    assert broken(lambda o: o[spec].update(shutdownAfterJobFinish=True))  # misspelt field
    assert broken(lambda o: o[spec].update(backoffLimit="2"))  # string for an integer
    assert broken(lambda o: o[spec]["rayClusterSpec"]["authOptions"].update(mode="password"))
    assert broken(lambda o: o[spec]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"))
    assert broken(lambda o: o[spec]["rayClusterSpec"].pop("headGroupSpec"))
    assert broken(
        lambda o: o[spec]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][
            0
        ].update(imagePullPolicy=["Always"])
    )


# --------------------------------------------------------------------------- sizing


def test_gpu_worker_groups_are_nodes_times_gpus(tmp_path: Path) -> None:
    big = render(tmp_path, ROOT / "configs/llama-3-70b-lora-zero3.yaml")["rayjob.yaml"]
    (group,) = big["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (4, 4, 4)
    limits = resources(group["template"]["spec"])["limits"]
    assert limits["nvidia.com/gpu"] == "8" and limits["cpu"] == "96"
    spec = group["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in spec["volumes"]

    small = render(tmp_path, ROOT / "configs/llama-3-8b-qlora.yaml")["rayjob.yaml"]
    (group,) = small["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 1
    assert resources(group["template"]["spec"])["limits"]["nvidia.com/gpu"] == "1"

    # 12 workers on 8-GPU nodes: two nodes, not one and a half.
    odd = render(tmp_path, ROOT / "configs/llama-3-70b-lora-zero3.yaml", "cluster.num_workers=12")
    assert odd["rayjob.yaml"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2

    for objs in (big, small):
        head = objs["spec"]["rayClusterSpec"]["headGroupSpec"]
        assert "nvidia.com/gpu" not in resources(head["template"]["spec"])["limits"]
        assert head["rayStartParams"]["num-gpus"] == "0"
        assert "nodeSelector" not in head["template"]["spec"]


def test_cpu_quickstart_has_no_gpu_resources(tmp_path: Path) -> None:
    objs = render(tmp_path, ROOT / "configs/quickstart.yaml")
    for name in ("rayjob.yaml", "rayservice.yaml"):
        text = yaml.safe_dump(objs[name])
        assert "nvidia.com/gpu" not in text and "num_gpus: 1" not in text
    cluster = objs["rayjob.yaml"]["spec"]["rayClusterSpec"]
    assert cluster["workerGroupSpecs"][0]["groupName"] == "cpu-workers"
    assert cluster["workerGroupSpecs"][0]["replicas"] == 1  # 2 workers + data on 8 CPUs


def test_token_auth_is_on_in_both_clusters(tmp_path: Path) -> None:
    objs = render(tmp_path, ROOT / "configs/llama-3-8b-qlora.yaml")
    job = objs["rayjob.yaml"]["spec"]["rayClusterSpec"]
    svc = objs["rayservice.yaml"]["spec"]["rayClusterConfig"]
    for cluster in (job, svc):
        assert cluster["authOptions"] == {"mode": "token"}
        assert cluster["rayVersion"] == K8sConfig().ray_version
    named = render(tmp_path, ROOT / "configs/quickstart.yaml", "cluster.k8s.auth_secret=ray-tok")
    for name, key in (("rayjob.yaml", "rayClusterSpec"), ("rayservice.yaml", "rayClusterConfig")):
        auth = named[name]["spec"][key]["authOptions"]
        assert auth == {"mode": "token", "secretName": "ray-tok"}


def test_rayjob_lifecycle_and_entrypoint(tmp_path: Path) -> None:
    spec = render(tmp_path, ROOT / "configs/quickstart.yaml")["rayjob.yaml"]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] == 2 and spec["ttlSecondsAfterFinished"] == 3600
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["entrypoint"] == (
        f"rayft prepare {k8s.CONFIG_FILE} && rayft train {k8s.CONFIG_FILE} --resume"
    )


# --------------------------------------------------------------------------- storage & config


def test_pvc_storage_mounts_the_claim_and_moves_the_run_dir(tmp_path: Path) -> None:
    objs = render(tmp_path, ROOT / "configs/llama-3-8b-qlora.yaml")
    claim = objs["pvc.yaml"]
    assert claim["kind"] == "PersistentVolumeClaim" and claim["metadata"]["name"] == "rayft-runs"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "500Gi"
    for pod in pods(objs["rayjob.yaml"]["spec"]["rayClusterSpec"]):
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["rayft-storage"]["persistentVolumeClaim"] == {"claimName": "rayft-runs"}
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts == {
            "rayft-storage": k8s.MOUNT,
            "rayft-config": "/etc/rayft",
            "dshm": "/dev/shm",
        }
    job = load_job_file(objs, tmp_path)
    assert job.run_dir == f"{k8s.MOUNT}/runs/llama-3-8b-qlora"
    assert job.cluster.storage_path is None  # checkpoints under the run dir, on the claim
    assert job.serve.adapters == {"support": f"{k8s.MOUNT}/runs/llama-3-8b-qlora/adapter"}
    assert job.data.train_files == [f"{k8s.IMAGE_PROJECT}/examples/data/support.jsonl"]


def test_s3_storage_sends_checkpoints_to_s3(tmp_path: Path) -> None:
    objs = render(tmp_path, ROOT / "configs/quickstart.yaml", "cluster.k8s.storage=s3://b/rft/")
    assert "pvc.yaml" not in objs
    job = load_job_file(objs, tmp_path)
    assert job.cluster.storage_path == "s3://b/rft/quickstart/checkpoints"
    for pod in pods(objs["rayjob.yaml"]["spec"]["rayClusterSpec"]):
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["rayft-storage"] == {"name": "rayft-storage", "emptyDir": {}}
        # Credentials (and HF_TOKEN) come from a Secret, never from the manifest.
        assert pod["containers"][0]["envFrom"] == [
            {"secretRef": {"name": "rayft-env", "optional": True}}
        ]
    big = render(tmp_path, ROOT / "configs/llama-3-70b-lora-zero3.yaml")
    assert load_job_file(big, tmp_path).cluster.storage_path == "s3://my-bucket/rayft/checkpoints"


def load_job_file(objs: dict, tmp_path: Path) -> JobConfig:
    """The job file as the pods read it, loaded by rayft itself."""
    cm = objs["configmap.yaml"]
    path = Path(k8s.CONFIG_FILE)
    mounted = [
        v
        for v in pods(objs["rayjob.yaml"]["spec"]["rayClusterSpec"])[0]["volumes"]
        if v["name"] == "rayft-config"
    ]
    assert mounted[0]["configMap"]["name"] == cm["metadata"]["name"]
    mounted_file = tmp_path / path.name
    mounted_file.write_text(cm["data"][path.name])
    return load_config(mounted_file)


def test_changed_config_gets_a_new_configmap_name(tmp_path: Path) -> None:
    a = render(tmp_path, ROOT / "configs/quickstart.yaml")["configmap.yaml"]["metadata"]["name"]
    b = render(tmp_path, ROOT / "configs/quickstart.yaml", "training.max_steps=5")
    assert a != b["configmap.yaml"]["metadata"]["name"]
    assert (
        a
        == render(tmp_path, ROOT / "configs/quickstart.yaml")["configmap.yaml"]["metadata"]["name"]
    )


# --------------------------------------------------------------------------- serving


def test_serve_config_names_the_app_builder_and_bounds(tmp_path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    objs = render(
        tmp_path,
        ROOT / "configs/quickstart.yaml",
        "serve.autoscaling={min_replicas: 1, max_replicas: 20, target_ongoing_requests: 2}",
    )
    svc = objs["rayservice.yaml"]["spec"]
    assert svc["upgradeStrategy"] == {"type": "NewCluster"}
    serve = yaml.safe_load(svc["serveConfigV2"])
    ServeDeploySchema.model_validate(serve)  # Ray Serve's own schema accepts it
    (app,) = serve["applications"]
    assert app["import_path"] == "rayft.serving.app:app_builder"
    assert app["args"] == {"config": k8s.CONFIG_FILE, "overrides": []}
    (engine,) = app["deployments"]
    assert engine["name"] == "engine-base"
    assert engine["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 20,
        "target_ongoing_requests": 2.0,
    }
    assert serve["http_options"] == {"host": "0.0.0.0", "port": 8000}
    # 20 one-CPU replicas on 8-CPU workers: 1..3 worker pods, scaled by the Ray autoscaler.
    cluster = svc["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 3)
    assert cluster["enableInTreeAutoscaling"] is True


def test_vllm_replicas_get_their_gpus(tmp_path: Path) -> None:
    objs = render(tmp_path, ROOT / "configs/llama-3-70b-lora-zero3.yaml")
    serve = yaml.safe_load(objs["rayservice.yaml"]["spec"]["serveConfigV2"])
    engine = serve["applications"][0]["deployments"][0]
    assert engine["num_replicas"] == 2 and engine["ray_actor_options"]["num_gpus"] == 4
    (group,) = objs["rayservice.yaml"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["replicas"] == 1  # two 4-GPU replicas fit on one 8-GPU node
    # vLLM's GPU comes from the config's rule, the one `rayft serve` reserves locally too.
    unset = render(tmp_path, ROOT / "configs/quickstart.yaml", "serve.engine=vllm")
    serve = yaml.safe_load(unset["rayservice.yaml"]["spec"]["serveConfigV2"])
    assert serve["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] == 1
    with pytest.raises(k8s.RenderError, match="cannot span nodes"):
        render(tmp_path, ROOT / "configs/llama-3-8b-qlora.yaml", "serve.gpus_per_replica=2")


# --------------------------------------------------------------------------- CLI, k8s/, docker/


def test_cli_render_prints_files_and_next_steps(tmp_path: Path, capsys) -> None:
    out = tmp_path / "m"
    assert main(["k8s", "render", str(ROOT / "configs/quickstart.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'rayjob.yaml'}" in printed
    assert f"kubectl apply -k {out}" in printed and "rayservice.yaml" in printed
    bad = ["k8s", "render", str(ROOT / "configs/quickstart.yaml"), "--out", str(out)]
    assert main([*bad, "--set", "cluster.k8s.storage=nfs://x"]) == 2
    assert "use `pvc:<claim-name>` or an s3:// prefix" in capsys.readouterr().err
    assert main([*bad, "--set", "name=" + "x" * 50]) == 2


def test_checked_in_manifests_match_a_fresh_render(tmp_path: Path) -> None:
    for config in CONFIGS:
        source = f"configs/{config.name}"
        fresh = tmp_path / config.stem
        k8s.render(load_config(config), fresh, config_path=source)
        kept = RENDERED / config.stem
        again = f"rayft k8s render {source} --out k8s/rendered/{config.stem}"
        names = sorted(p.name for p in fresh.iterdir())
        assert sorted(p.name for p in kept.glob("*")) == names, f"stale files; run: {again}"
        for name in names:
            assert (kept / name).read_text() == (fresh / name).read_text(), (
                f"k8s/rendered/{config.stem}/{name} is out of date; run: {again}"
            )


def test_kustomize_layout_points_at_rendered_manifests() -> None:
    rendered = RENDERED / "quickstart" / "kustomization.yaml"
    assert "rayservice.yaml" not in yaml.safe_load(rendered.read_text())["resources"]
    layers = [ROOT / "k8s/base", *sorted((ROOT / "k8s/overlays").iterdir())]
    assert len(layers) >= 3
    for layer in layers:
        kust = yaml.safe_load((layer / "kustomization.yaml").read_text())
        for ref in kust.get("resources", []):
            assert (layer / ref).exists(), f"{layer}: {ref} does not exist"
        for patch in kust.get("patches", []):
            if "path" in patch:
                assert (layer / patch["path"]).is_file()


def test_dockerfile_matches_the_manifests() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    defaults = K8sConfig()
    assert f"ARG RAY_VERSION={defaults.ray_version}" in text
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-" in text
    assert "'[vllm]'" in text and '"vllm==' in text  # the GPU image serves with vLLM
    assert f"WORKDIR {k8s.IMAGE_PROJECT}" in text
    image_tags = {load_config(c).cluster.k8s.image.split(":")[1] for c in CONFIGS}
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert all(tag.startswith(version) for tag in image_tags)
