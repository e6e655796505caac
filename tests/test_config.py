import pytest

from rayft.cli import main
from rayft.config import VLLM_LORA_RANKS, ConfigError, JobConfig, field_help, load_config


def write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, "run_dir: runs/x\ntraining:\n  max_steps: 5\n")
    cfg = load_config(p, ["training.max_steps=7", "data.train_files=[a.jsonl, b.jsonl]"])
    assert cfg.training.max_steps == 7
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    assert cfg.model.base == "smollm2-135m-instruct"


def test_unknown_key_did_you_mean(tmp_path):
    p = write(tmp_path, "training:\n  max_step: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "training.max_step: unknown key — did you mean 'max_steps'?" in str(e.value)
    assert str(p) in str(e.value)


def test_nested_unknown_key(tmp_path):
    p = write(tmp_path, "training:\n  deepspeed:\n    zero_stag: 2\n")
    with pytest.raises(ConfigError, match="did you mean 'zero_stage'"):
        load_config(p)


def test_bad_value_names_field(tmp_path):
    with pytest.raises(ConfigError, match="training.method"):
        load_config(write(tmp_path, "training:\n  method: lorra\n"))


def test_remote_code_needs_revision():
    with pytest.raises(ConfigError, match="revision"):
        load_config(None, ["model.trust_remote_code=true"])
    cfg = load_config(None, ["model.trust_remote_code=true", "model.revision=abc123"])
    assert cfg.model.trust_remote_code


def test_override_errors():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["training.max_steps"])


def test_digest_changes_with_config():
    assert JobConfig().digest() == JobConfig().digest()
    assert JobConfig().digest() != load_config(None, ["training.max_steps=3"]).digest()


def test_every_field_has_help():
    rows = field_help()
    assert len(rows) > 50
    missing = [k for k, _, d in rows if not d]
    assert missing == []


def test_config_show_cli(tmp_path, capsys):
    p = write(tmp_path, "name: demo\n")
    assert main(["config", "show", str(p), "--set", "training.method=dora"]) == 0
    out = capsys.readouterr().out
    assert "name: demo" in out and "method: dora" in out
    assert main(["config", "show", str(write(tmp_path, "nme: x\n"))]) == 2
    assert "did you mean 'name'" in capsys.readouterr().err


def test_vllm_takes_only_the_lora_ranks_vllm_accepts(tmp_path):
    p = write(tmp_path, "serve:\n  engine: vllm\n  max_lora_rank: 48\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "serve.max_lora_rank=48" in str(e.value)
    assert "1, 8, 16, 32, 64, 128, 256, 320, 512" in str(e.value)
    assert load_config(p, ["serve.max_lora_rank=320"]).serve.max_lora_rank == 320
    # The transformers engine pads any rank.
    assert load_config(p, ["serve.engine=transformers"]).serve.max_lora_rank == 48


def test_vllm_replicas_get_a_gpu_unless_told_none(tmp_path):
    p = write(tmp_path, "serve:\n  engine: vllm\n")
    assert load_config(p).serve.gpus_per_replica == 1
    assert load_config(p, ["serve.gpus_per_replica=2"]).serve.gpus_per_replica == 2
    assert load_config(None).serve.gpus_per_replica == 0  # transformers runs on CPU
    for gpus in ("0", "0.5"):
        with pytest.raises(ConfigError, match=f"serve.gpus_per_replica={gpus} with serve.engine"):
            load_config(p, [f"serve.gpus_per_replica={gpus}"])
    (help_text,) = [d for k, _, d in field_help() if k == "serve.gpus_per_replica"]
    assert "vllm it defaults to 1" in help_text


def test_vllm_lora_ranks_are_vllms_own():
    from typing import get_args

    lora = pytest.importorskip("vllm.config.lora")  # on the GPU image
    assert get_args(lora.MaxLoRARanks) == VLLM_LORA_RANKS
