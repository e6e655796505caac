"""`rayft plan`: published memory figures, exact parameter counts, ZeRO's division, the JSON."""

from __future__ import annotations

import argparse
import json

import pytest

from rayft.config import JobConfig
from rayft.plan import memory, plan, published, render
from rayft.plan.memory import GIB, Setup
from rayft.plan.shapes import from_config, resolve


@pytest.mark.parametrize("fig,planned", published.build(), ids=lambda v: getattr(v, "key", ""))
def test_published_figure(fig, planned):
    """docs/planner.md's table: within 15% of each figure, right about every fit."""
    err = published.error(fig, planned)
    assert published.correct(fig, planned), (fig.key, fig.published, planned, err)


def test_docs_table_is_current():
    text = (published.__file__.rsplit("/rayft/", 1)[0] + "/docs/planner.md").strip()
    with open(text) as f:
        assert published.markdown() in f.read(), "regenerate: python -m rayft.plan.published"


def test_llama_3_1_parameter_counts():
    assert resolve("meta-llama/Llama-3.1-8B").params() == 8_030_261_248
    assert resolve("meta-llama/Llama-3.1-70B").params() == 70_553_706_496
    assert round(resolve("meta-llama/Llama-3.1-70B-Instruct").params() / 1e9, 1) == 70.6


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "llama", "num_key_value_heads": 2, "tie_word_embeddings": False},
        {"model_type": "qwen2", "num_key_value_heads": 2, "tie_word_embeddings": True},
        {"model_type": "mixtral", "num_key_value_heads": 2, "num_local_experts": 4},
        {"model_type": "gemma2", "num_key_value_heads": 2, "head_dim": 32},
        {"model_type": "opt", "ffn_dim": 96, "word_embed_proj_dim": 64},
    ],
    ids=lambda c: c["model_type"],
)
def test_parameter_count_exact(config, tmp_path):
    """The count from config.json equals transformers' own model, to the parameter."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 96,
        "vocab_size": 300,
        "max_position_embeddings": 128,
    }
    cfg = AutoConfig.for_model(**(base | config))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    exact = sum(p.numel() for p in model.parameters())
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    assert resolve(str(tmp_path)).params() == exact
    assert from_config(cfg.to_dict(), "x").params() == exact


def test_zero_divides_each_part_over_the_workers():
    shape = resolve("meta-llama/Llama-2-7b-hf")
    one = memory.training(shape, Setup(method="full", zero_stage=1, world=1))["breakdown"]
    parts = {}
    for stage in (1, 2, 3):
        parts[stage] = memory.training(shape, Setup(method="full", zero_stage=stage, world=8))[
            "breakdown"
        ]
    assert parts[1]["optimizer"] == pytest.approx(one["optimizer"] / 8)
    assert parts[1]["gradients"] == pytest.approx(one["gradients"])
    assert parts[2]["gradients"] == pytest.approx(one["gradients"] / 8)
    assert parts[2]["weights"] == pytest.approx(one["weights"])
    assert parts[3]["weights"] == pytest.approx(one["weights"] / 8)
    # offload: the optimizer leaves the GPU for the node's RAM (4 workers per node here)
    off = memory.training(
        shape, Setup(method="full", zero_stage=2, world=8, gpus_per_node=4, offload_optimizer=True)
    )
    assert off["breakdown"]["optimizer"] == 0
    expected = 4 * (one["optimizer"] / 8 + 4 * shape.params() / 8 / GIB)
    assert off["cpu_ram_gib_per_node"] == pytest.approx(expected)


def test_4bit_weights_with_double_quant():
    shape = resolve("meta-llama/Llama-3.1-8B")
    lin, rest = shape.linear_params(), shape.params() - shape.linear_params()
    for dq, per in ((False, 0.5 + 4 / 64), (True, 0.5 + 1 / 64 + 4 / 64 / 256)):
        got = memory.training(shape, Setup(method="qlora", double_quant=dq))["breakdown"]["weights"]
        assert got * GIB == pytest.approx(lin * per + rest * 2)


def _cfg(tmp_path, **training) -> JobConfig:
    return JobConfig(
        run_dir=str(tmp_path / "run"),
        model={"base": "meta-llama/Llama-3.1-8B"},
        data={"max_seq_len": 2048},
        training={"method": "lora", **training},
        cluster={"num_workers": 1, "use_gpu": True},
    )


def test_plan_json_keys_and_verdict(tmp_path):
    result = plan(_cfg(tmp_path), "A10G", 1.5)
    for key in ("params", "fits", "per_gpu_gib", "breakdown", "cpu_ram_gib_per_node"):
        assert key in result
    assert set(result["min_cluster"] or {}) <= {
        "nodes",
        "gpus_per_node",
        "num_workers",
        "per_gpu_gib",
    }
    for key in ("tokens_per_s", "hours", "cost_usd"):
        assert result[key] > 0
    assert set(result["serving"]) >= {"fits", "per_gpu_gib", "max_concurrency"}
    assert sum(result["breakdown"].values()) == pytest.approx(result["per_gpu_gib"], abs=0.05)
    # 8B LoRA at 2048 tokens without checkpointing does not fit 24 GB; checkpointing does
    assert not result["fits"]
    assert result["cheapest_fix"]["set"] == "training.gradient_checkpointing=true"
    assert plan(_cfg(tmp_path, gradient_checkpointing=True), "A10G")["fits"]
    assert result["cost_usd"] == pytest.approx(result["hours"] * 1.5)
    json.dumps(result)
    assert "DOES NOT FIT" in render(result)


def test_smallest_cluster_for_full_fine_tune(tmp_path):
    cfg = _cfg(tmp_path, method="full", gradient_checkpointing=True, deepspeed={"zero_stage": 3})
    result = plan(cfg, "H100")
    assert not result["fits"]  # 8B x 16 B/param on one 80 GB GPU
    m = result["min_cluster"]
    assert m["num_workers"] == 2 and m["nodes"] == 2 and m["per_gpu_gib"] < 79.6


def test_serving_concurrency(tmp_path):
    s = plan(_cfg(tmp_path), "L4", concurrency=1, max_model_len=8192)["serving"]
    per_seq = resolve("meta-llama/Llama-3.1-8B").kv_bytes_per_token(2) * 8192 / GIB
    assert s["kv_cache_gib"] == pytest.approx(per_seq)  # 128 KiB per token: 1 GiB per 8192
    assert s["fits"] and s["max_concurrency"] >= 1
    over = plan(_cfg(tmp_path), "L4", concurrency=s["max_concurrency"] + 1, max_model_len=8192)
    assert not over["serving"]["fits"]


def test_cli(tmp_path, capsys):
    from rayft.cli import _config_args
    from rayft.plan.cli import add_cli

    job = tmp_path / "job.yaml"
    job.write_text(
        "model: {base: Qwen/Qwen2.5-0.5B-Instruct}\ncluster: {use_gpu: true}\n"
        f"run_dir: {tmp_path / 'run'}\n"
    )
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(), _config_args)
    args = parser.parse_args(
        ["plan", str(job), "--gpu", "L4", "--json", "--set", "data.max_seq_len=512"]
    )
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 494_032_768 and out["max_seq_len"] == 512 and out["fits"]


def test_launches_are_checked_against_the_plan(tmp_path, capsys):
    """`rayft train` on GPUs, `rayft submit ... -- train` and `rayft k8s render` refuse a job that
    does not fit before anything starts (the breakdown and the cheapest fix printed);
    --no-plan-check launches anyway; an unknown shape is not a refusal."""
    from rayft.cli import main

    job = tmp_path / "job.yaml"
    job.write_text(
        "model: {base: meta-llama/Llama-3.1-70B}\ntraining: {method: full}\n"
        "cluster: {use_gpu: true, num_workers: 8, gpu_type: A100-80GB}\n"
    )
    nowhere = "http://127.0.0.1:9"  # nothing listens: only a check that ran first answers
    launches = [
        ["train", str(job)],
        ["submit", str(job), "--address", nowhere, "--project", str(tmp_path), "--", "train"],
        ["k8s", "render", str(job), "--out", str(tmp_path / "k8s")],
    ]
    for argv in launches:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "does not fit" in err and "on A100-80GB" in err, err
        assert "cheapest fix: " in err and "--set training." in err
    assert not (tmp_path / "k8s").exists()
    assert main([*launches[2], "--no-plan-check"]) == 0  # rendered anyway
    assert (tmp_path / "k8s" / "rayjob.yaml").exists()
    assert main([*launches[1][:-2], "--no-plan-check", "--", "train"]) == 2
    assert "does not fit" not in capsys.readouterr().err  # it went on, to the missing cluster
    job.write_text("model: {base: org/unknown-model}\ncluster: {use_gpu: true}\n")
    assert main(launches[2]) == 0
    assert "not checked" in capsys.readouterr().out


def test_dpo_doubles_the_batch_and_a_full_fine_tune_keeps_a_reference(tmp_path):
    """DPO's forward holds chosen and rejected together (activations and logits x2); its
    reference model is the base with the adapter off (LoRA: nothing more) or, for a full
    fine-tune, a frozen copy of the weights, sharded like them by ZeRO-3."""
    base = {"model": {"base": "meta-llama/Llama-3.1-8B"}, "cluster": {"use_gpu": True}}

    def parts(**training) -> dict:
        return plan(JobConfig(**base, training=training))["breakdown"]

    sft, dpo = parts(), parts(objective="dpo")
    for part in ("activations", "logits"):
        assert dpo[part] == pytest.approx(2 * sft[part], rel=1e-3)
    assert sft["reference"] == dpo["reference"] == 0
    full = parts(method="full", objective="dpo", deepspeed={"zero_stage": 3})
    weights = parts(method="full", deepspeed={"zero_stage": 3})["weights"]
    assert full["reference"] == pytest.approx(weights, rel=1e-3) and full["reference"] > 0


def test_dataset_tokens_estimated_from_the_files_before_prepare(tiny_model):
    """Before `rayft prepare` counted them, the dataset's tokens come from the files' size:
    within 10% of the real count on the demo data (SmolLM2's tokenizer, its chat template)."""
    from transformers import AutoTokenizer

    from rayft import models
    from rayft.plan.job import _estimated_tokens

    demo = "examples/data/support.jsonl"
    cfg = JobConfig(data={"train_files": [demo]}, run_dir="/nonexistent/run")
    tok = AutoTokenizer.from_pretrained(str(models.resolve("smollm2-135m-instruct")))
    with open(demo) as f:
        rows = [json.loads(line)["messages"] for line in f]
    real = sum(len(tok(tok.apply_chat_template(m, tokenize=False))["input_ids"]) for m in rows)
    assert _estimated_tokens(cfg) == pytest.approx(real, rel=0.10)
    out = plan(cfg, "H100-80GB")
    assert (
        out["dataset_tokens"] == _estimated_tokens(cfg) and "not prepared" in out["tokens_source"]
    )
    assert _estimated_tokens(JobConfig(data={"train_files": ["s3://b/x.jsonl"]})) is None
