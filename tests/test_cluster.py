"""Ray Jobs submission specs, the pre-flight's judgement and `cluster status`, without a real
cluster: the resource arithmetic and refusal messages run on what rayft.cluster.survey found on a
`ray.cluster_utils.Cluster` of three nodes (one with fake GPUs). tests/test_cluster_real.py runs
the same on a cluster started with `ray start`, end to end."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rayft.cluster import status, submission
from rayft.cluster.fetch import _write
from rayft.cluster.fetch import main as fetch_main
from rayft.cluster.preflight import judge, paths, stages_of
from rayft.cluster.status import _usage
from rayft.config import ConfigError, JobConfig, load_config
from rayft.errors import RayftError

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- submission


def test_submission_carries_project_config_and_marks_job(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    cfg = tmp_path / "configs" / "job.yaml"
    cfg.write_text("name: demo\nrun_dir: /shared/runs/demo\n")
    spec = submission(
        cfg, ["--", "prepare", "--limit", "3"], overrides=["training.max_steps=1"], project=tmp_path
    )
    assert spec["entrypoint"] == (
        "python -m rayft.cli prepare configs/job.yaml --limit 3 --set=training.max_steps=1"
    )
    env = spec["runtime_env"]
    assert env["working_dir"] == str(tmp_path)
    assert Path(env["py_modules"][0]).joinpath("cli.py").is_file()
    assert {".git/", ".venv/", "runs/"} <= set(env["excludes"])
    assert spec["metadata"] == {
        "rayft": "1",
        "stage": "prepare",
        "config": "configs/job.yaml",
        "run_dir": "/shared/runs/demo",
        "python": "python",
    }

    # Subcommands of two words keep the config after both.
    spec = submission(cfg, ["--", "ab", "report", "--json"], project=tmp_path)
    assert spec["entrypoint"] == "python -m rayft.cli ab report configs/job.yaml --json"
    assert spec["metadata"]["stage"] == "ab report"


def test_submission_runs_the_clusters_python_in_the_runtime_env(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "cluster:\n  python: /opt/venv/bin/python\n"
        "  runtime_env: {pip: [peft==0.18.1], env_vars: {HF_HOME: /mnt/hf}}\n"
    )
    spec = submission(cfg, ["train"], project=tmp_path)
    assert spec["entrypoint"] == "/opt/venv/bin/python -m rayft.cli train job.yaml"
    env = spec["runtime_env"]
    assert env["pip"] == ["peft==0.18.1"] and env["env_vars"] == {"HF_HOME": "/mnt/hf"}
    assert env["working_dir"] == str(tmp_path)  # rayft's own keys stay
    spec = submission(cfg, ["train"], ["cluster.python=uv run python"], project=tmp_path)
    assert spec["entrypoint"].startswith("uv run python -m rayft.cli train")


def test_runtime_env_takes_packages_and_env_vars_only(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text("name: x\n")
    for bad, words in [
        ("{conda: myenv}", "conda not supported; use pip, uv, env_vars"),
        ("{working_dir: .}", "working_dir not supported"),
        ("{pip: [a], uv: [b]}", "either pip or uv"),
        ("{pip: peft}", "a list of requirement strings"),
        ("{env_vars: {A: 1}}", 'quote numbers: "1"'),
        ("{env_vars: {TOKENIZERS_PARALLELISM: 'true'}}", "set by rayft's stages themselves"),
    ]:
        with pytest.raises(ConfigError, match="cluster.runtime_env") as e:
            load_config(cfg, [f"cluster.runtime_env={bad}"])
        assert words in str(e.value)


def test_submission_from_this_checkout_uploads_the_package_once() -> None:
    spec = submission(ROOT / "configs" / "quickstart.yaml", ["train"], project=ROOT)
    assert "/rayft/" in spec["runtime_env"]["excludes"]
    assert spec["entrypoint"].endswith("train configs/quickstart.yaml")


def test_submission_rejects_missing_stage_file_and_outside_config(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text("name: demo\n")
    with pytest.raises(RayftError, match="no stage"):
        submission(cfg, ["--"], project=tmp_path)
    with pytest.raises(RayftError, match="not found"):
        submission(tmp_path / "missing.yaml", ["prepare"], project=tmp_path)
    with pytest.raises(RayftError, match="outside the project"):
        submission(cfg, ["prepare"], project=tmp_path / "elsewhere")


def test_relative_run_dir_is_refused_for_submission_and_resolved_under_address(
    tmp_path: Path, monkeypatch
) -> None:
    cfg = JobConfig.model_validate({"name": "demo", "run_dir": "runs/demo"})
    with pytest.raises(RayftError) as e:
        paths(cfg, ("train",), submitted=True)
    assert "run_dir=runs/demo is relative" in str(e.value)
    assert "absolute path on storage every node shares" in str(e.value)
    assert "--set run_dir=/mnt/shared/demo" in str(e.value)
    monkeypatch.chdir(tmp_path)
    assert paths(cfg, ("train",), submitted=False) == {"run_dir": str(tmp_path / "runs/demo")}
    s3 = cfg.model_copy(update={"run_dir": "/mnt/r"}, deep=True)
    s3.cluster.storage_path = "s3://bucket/ckpt"
    assert paths(s3, ("train",), submitted=True) == {
        "run_dir": "/mnt/r",
        "cluster.storage_path": "s3://bucket/ckpt",
    }
    assert "cluster.storage_path" not in paths(s3, ("eval",), submitted=True)  # train's alone
    with pytest.raises(RayftError, match="write the run dir as files"):
        paths(cfg.model_copy(update={"run_dir": "s3://b/run"}), ("train",), submitted=True)


# --------------------------------------------------------------------------- the pre-flight

SURVEY = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from rayft.cluster.survey import survey

    run_dir, port = sys.argv[1], int(sys.argv[2])
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "gcs_server_port": port, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        cluster.wait_for_nodes()
        found = survey(["ray", "torch", "peft", "trl", "pyarrow", "transformers"],
                       {"run_dir": run_dir})
        print("RESULT " + json.dumps(found))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory) -> dict:
    """What the survey finds on 2 + 1 CPUs + a node of 2 CPUs and 2 GPUs. In a subprocess: a
    process holds one Ray connection, and the session's `ray_local` may hold this one's."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path_factory.mktemp("shared") / "run"
    proc = subprocess.run(
        [sys.executable, "-c", SURVEY, str(run_dir), str(port)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def _job(**cluster) -> JobConfig:
    return JobConfig.model_validate({"run_dir": "/shared/run", "cluster": cluster})


def test_survey_sees_every_node_its_resources_packages_and_the_shared_run_dir(three_nodes):
    nodes = three_nodes["nodes"]
    assert len(nodes) == 3 and nodes[0]["head"]
    assert sorted(n["total"]["CPU"] for n in nodes) == [1, 2, 2]
    assert [n["total"].get("GPU", 0) for n in nodes if n["total"]["CPU"] == 2] in ([0, 2], [2, 0])
    assert all(n["free"]["CPU"] == n["total"]["CPU"] for n in nodes)
    from importlib.metadata import version

    for env in [three_nodes["driver"], *nodes]:
        assert env["packages"]["peft"] == version("peft")
        assert env["packages"]["ray"] == version("ray")
        assert env["python"] == ".".join(map(str, sys.version_info[:3]))
        assert env["origins"] == {}
    assert three_nodes["driver"]["paths"]["run_dir"][1] == "ok"
    assert all(n["paths"] == {"run_dir": "ok"} for n in nodes)  # one machine: shared
    run_dir = Path(three_nodes["driver"]["paths"]["run_dir"][0])
    assert list(run_dir.iterdir()) == []  # the markers are gone


def test_training_workers_that_leave_no_cpu_for_data_are_refused(three_nodes):
    ok = judge(_job(num_workers=4), ("train",), three_nodes)
    assert ok.errors == [] and ok.warnings == []
    assert any("2/2 CPU, 2/2 GPU free" in line for line in ok.lines)

    starved = judge(_job(num_workers=5), ("train",), three_nodes)
    (error,) = starved.errors
    assert error.startswith(
        "train needs 6 CPUs (5 training workers x 1 + 1 for the Ray Data tasks that feed them)"
    )
    assert "would wait for one forever" in error
    assert "Fix: --set cluster.num_workers=4; or --set cluster.cpus_per_worker=0.5" in error
    with pytest.raises(RayftError, match="pre-flight refused train on test:\n  - train needs"):
        starved.settle("train on test")

    # An autoscaling cluster adds nodes: the same shortfall is a warning.
    scaling = judge(_job(num_workers=5, autoscaling=True), ("train",), three_nodes)
    assert scaling.errors == [] and "waiting for the autoscaler" in scaling.warnings[0]


def test_gpus_placement_and_big_workers_are_checked_per_node(three_nodes):
    gpus = judge(_job(num_workers=3, use_gpu=True), ("train",), three_nodes).errors
    assert len(gpus) == 1 and "3 GPUs (3 training workers x 1)" in gpus[0]
    assert "--set cluster.num_workers=2" in gpus[0]

    spread = judge(_job(num_workers=2, use_gpu=True, placement_strategy="STRICT_SPREAD"),
                   ("train",), three_nodes).errors  # fmt: skip
    assert len(spread) == 1 and "2 GPUs" in spread[0]  # both GPUs are on one node

    big = judge(_job(num_workers=1, cpus_per_worker=3), ("train",), three_nodes).errors
    assert "no node can hold a single training worker" in big[0]

    pack = judge(_job(num_workers=3, placement_strategy="STRICT_PACK"), ("train",), three_nodes)
    assert "Fix: --set cluster.num_workers=2" in pack.errors[0]


def test_eval_and_serve_replicas_and_what_is_free_now(three_nodes):
    cfg = _job().model_copy(deep=True)
    cfg.eval.num_replicas = 6
    (error,) = judge(cfg, ("eval",), three_nodes).errors
    assert "eval needs 6 CPUs (6 eval replicas x 1)" in error
    assert "--set eval.num_replicas=5" in error
    cfg.serve.num_replicas, cfg.serve.cpus_per_replica = 3, 2
    (error,) = judge(cfg, ("serve",), three_nodes).errors
    assert "serve needs 6 CPUs (3 serve replicas x 2)" in error

    busy = copy.deepcopy(three_nodes)
    for node in busy["nodes"]:
        node["free"]["CPU"] = 0.0  # another job holds every CPU
    held = judge(_job(num_workers=1), ("train",), busy)
    assert held.errors == []
    assert "more than is free now" in held.warnings[0] and "waits until" in held.warnings[0]
    assert judge(_job(), stages_of("merge"), busy).errors == []  # runs in the driver


def test_a_node_with_another_package_or_none_is_refused_by_name(three_nodes):
    skewed = copy.deepcopy(three_nodes)
    one, two = skewed["nodes"][1], skewed["nodes"][2]
    one["packages"]["peft"] = "0.0.1"
    one["origins"] = {"peft": "/opt/old/peft"}
    two["packages"]["trl"] = None
    two["packages"]["torch"] = "1.0.0"
    errors = judge(_job(num_workers=1), ("train",), skewed).errors
    assert len(errors) == 3, errors
    peft_error = next(e for e in errors if e.startswith("peft 0.0.1, outside rayft's peft"))
    assert "(imported from /opt/old/peft)" in peft_error and "PYTHONPATH" in peft_error
    trl_error = next(e for e in errors if e.startswith("trl missing on node"))
    assert "pip install 'trl==" in trl_error and "cluster.runtime_env.pip" in trl_error
    assert any(e.startswith("torch 1.0.0, outside rayft's torch") for e in errors)
    assert judge(_job(), ("prepare",), skewed).errors == []  # prepare needs neither

    ray_skew = copy.deepcopy(three_nodes)
    ray_skew["nodes"][1]["packages"]["ray"] = "2.59.0"
    ray_skew["nodes"][2]["packages"]["transformers"] = "5.99.0"
    v = judge(_job(num_workers=1), ("train",), ray_skew)
    assert any("ray 2.59.0, the driver's" in e for e in v.errors)  # Ray: refused
    assert any(w.startswith("transformers 5.99.0 on node") for w in v.warnings)  # others: warned

    here = {**three_nodes["driver"], "python": "3.99.0"}
    v = judge(_job(num_workers=1), ("train",), three_nodes, client=here)
    assert v.errors == [] and "python 3.99.0 here" in v.warnings[0]


def test_storage_that_a_node_does_not_share_is_refused(three_nodes):
    apart = copy.deepcopy(three_nodes)
    apart["nodes"][1]["paths"]["run_dir"] = "not found: another filesystem than the driver's"
    (error,) = judge(_job(num_workers=1), ("train",), apart).errors
    assert "is not storage the driver and every node share" in error
    assert "another filesystem" in error and "NFS, a PVC" in error
    apart["driver"]["paths"]["run_dir"] = ("/ro/run", "the driver cannot write there (denied)")
    assert "the driver cannot write there" in judge(_job(), ("prepare",), apart).errors[0]


def test_a_stage_inside_a_ray_job_skips_a_second_preflight(monkeypatch) -> None:
    from rayft.cluster.connect import in_ray_job

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert not in_ray_job()
    job = {"runtime_env": {}, "metadata": {"rayft": "1", "stage": "train"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert in_ray_job()


# --------------------------------------------------------------------------- fetch, status


def test_fetch_carries_small_artifacts_through_a_log(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    for rel, data in {
        "run.json": b"{}",
        "adapter/adapter_model.safetensors": bytes(range(256)) * 5000,
        "eval/report.json": b'{"a": 1}',
        "data/data_report.json": b"{}",
        "data/train/part-000.parquet": b"split",
        "checkpoints/checkpoint_000001/x.pt": b"ckpt",
        "eval/adapter_cache/ab/adapter_model.safetensors": b"cache",
        "name with space.json": b"[]",
    }.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(data)
    assert fetch_main([json.dumps({"run_dir": str(run)})]) == 0
    logs = "Running entrypoint\n" + capsys.readouterr().out
    got = sorted(_write(logs, tmp_path / "out"))
    assert got == [
        "adapter/adapter_model.safetensors",
        "data/data_report.json",
        "eval/report.json",
        "name with space.json",
        "run.json",
    ]
    for rel in got:
        assert (tmp_path / "out" / rel).read_bytes() == (run / rel).read_bytes()

    damaged = logs.replace("sha256=", "sha256=0", 1)
    with pytest.raises(RayftError, match="arrived damaged"):
        _write(damaged, tmp_path / "again")
    with pytest.raises(RayftError, match="refusing the path"):
        _write('RAYFT_FILE "../evil" sha256=00\n', tmp_path / "again")


def test_dashboard_usage_lines_parse() -> None:
    text = "0.0/2.0 CPU\n1.0/1.0 GPU (1.0 used of 1.0 reserved in placement groups)\n"
    text += "512.00MiB/16.07GiB memory\n0B/6.89GiB object_store_memory"
    usage = _usage(text)
    assert usage["CPU"] == (0.0, 2.0) and usage["GPU"] == (1.0, 1.0)
    assert usage["memory"][0] == 512 * 2**20
    assert usage["object_store_memory"] == (0.0, 6.89 * 2**30)


def test_status_reports_local_cluster(ray_local, capsys) -> None:
    info = status()
    assert len(info["nodes"]) >= 1
    assert info["resources"]["CPU"][1] == 4
    assert info["resources"]["GPU"] == (0, 0)
    assert info["jobs"] == []  # the embedded Ray has no dashboard, hence no jobs
    out = capsys.readouterr().out
    assert "free/total: " in out and "/4 CPU" in out and "(head)" in out
