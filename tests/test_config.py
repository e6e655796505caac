import pytest

from rayft.cli import main
from rayft.config import ConfigError, JobConfig, field_help, load_config


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
