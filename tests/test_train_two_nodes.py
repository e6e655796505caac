"""A 2-node run: `ray.cluster_utils.Cluster` with 2 nodes, STRICT_SPREAD, 1 worker per node, on
data written by the real `rayft prepare` (prepare -> train through the run dir).

The cluster lives in a subprocess, so it never meets the session's `ray_local` fixture (a process
can hold only one Ray connection) nor other clusters on the machine (its own free GCS port).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from train_data import free_port, run_result_script

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from rayft.config import JobConfig
    from rayft.data import prepare
    from rayft.training import train

    run_dir, port = sys.argv[1], int(sys.argv[2])
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "gcs_server_port": port, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        cfg = JobConfig.model_validate({
            "name": "two-nodes", "run_dir": run_dir, "model": {"base": "tiny-llama"},
            "data": {"train_files": [run_dir + "/support.jsonl"], "max_seq_len": 512},
            "training": {"max_steps": 2, "learning_rate": 1e-2, "per_device_batch_size": 2},
            "cluster": {"num_workers": 2, "placement_strategy": "STRICT_SPREAD"},
        })
        prepare(cfg)
        art = train(cfg)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        print("RESULT " + json.dumps({"workers": art.summary["workers"], "nodes": nodes}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data" / "support.jsonl"


def test_prepare_then_train_on_two_nodes(tiny_model, tmp_path):
    lines = EXAMPLES.read_text().splitlines()[:80]
    (tmp_path / "support.jsonl").write_text("\n".join(lines) + "\n")
    result = run_result_script(SCRIPT, str(tmp_path), str(free_port()), timeout=600)
    assert len(result["nodes"]) == 2
    assert sorted(w["node_id"] for w in result["workers"]) == result["nodes"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    manifest = json.loads((tmp_path / "run.json").read_text())
    data_hash = manifest["stages"]["prepare"]["data_hash"]
    assert manifest["stages"]["train"]["data_hash"] == data_hash
    assert data_hash in (tmp_path / "adapter" / "README.md").read_text()
