"""`eval.grader` on a grpo run: prompt rows answered by tiny-llama and a random LoRA adapter on a
real local Ray, graded against each row's item, compared with paired statistics; the report's
GRPO reward plot and early-stop sentence from the run's metrics.jsonl and train_summary.json.
"""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_serve_units import make_adapter
from train_data import write_prompts

from rayft import cli
from rayft.config import load_config
from rayft.evaluation import evaluate, plots, report
from rayft.evaluation.generate import ArmRunner
from rayft.evaluation.testset import load_test_split
from rayft.graders import GraderError, build, grade

# The python part raises on rows marked `boom`: each arm has exactly those samples as errors,
# whatever it answered. The similarity part makes the score depend on the answer.
GRADER = {
    "type": "multi",
    "name": "score",
    "graders": {
        "sim": {
            "type": "text_similarity",
            "input": "{{ sample.output_text }}",
            "reference": "{{ item.answer }}",
            "evaluation_metric": "fuzzy_match",
        },
        "length": {
            "type": "python",
            "source": "def grade(sample, item):\n"
            "    if item.get('boom'):\n"
            "        raise ValueError('boom row')\n"
            "    return len(sample['output_text']) % 5 / 5",
        },
    },
    "calculate_output": "sim + length",
}
BOOM = 2
N = 10


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_model):
    run = tmp_path_factory.mktemp("grpo_eval")
    rows = [
        {"prompt": f"What is {i} plus {i}? Answer with the number.", "answer": str(2 * i)}
        for i in range(N)
    ]
    for row in rows[:BOOM]:
        row["boom"] = True
    write_prompts(run, {"test": rows})
    make_adapter(tiny_model, run / "adapter", seed=1)
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, 9):
            f.write(json.dumps({"step": step, "loss": 0.01, "reward": 0.1 * step}) + "\n")
            if step % 2 == 0:
                f.write(json.dumps({"step": step, "eval_reward": 0.05 * step}) + "\n")
    stop = {
        "metric": "eval_reward",
        "mode": "max",
        "best": 0.2,
        "best_step": 4,
        "since_best": 2,
        "stopped_at": 8,
        "stopped": True,
        "patience": 2,
        "min_delta": 0.0,
        "reason": "eval_reward did not rise by more than 0 in 2 evaluation(s) after its best, "
        "0.2 at step 4",
    }
    rewards = {"first_quarter_mean": 0.15, "last_quarter_mean": 0.75, "eval_first": 0.1,
               "eval_last": 0.4, "grader_errors": 3.0}  # fmt: skip
    summary = {"steps": 8, "early_stopping": stop, "rewards": rewards}
    (run / "train_summary.json").write_text(json.dumps(summary))
    return run


def _config(run, tiny_model, **eval_fields) -> dict:
    return {
        "name": "grpo-eval",
        "run_dir": str(run),
        "model": {"base": tiny_model},
        "eval": {"max_new_tokens": 8, "batch_size": 4, "bootstrap_samples": 300, **eval_fields},
    }


@pytest.mark.slow
def test_eval_grades_every_arm_on_prompt_rows(grpo_run, tiny_model, ray_local, capsys):
    path = grpo_run / "eval.yaml"
    cfg = _config(grpo_run, tiny_model, candidates=["adapter"], grader=GRADER, forgetting=False)
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["eval", str(path)]) == 0
    out = capsys.readouterr().out.replace("\n", "")
    doc = json.loads((grpo_run / "eval" / "report.json").read_text())
    assert doc["n_examples"] == N

    # The grader, rebuilt here, on the answers each arm gave: the same per-arm means and errors.
    mine = build(GRADER, allow_python=True)
    items = [x["item"] for x in doc["examples"]]
    assert sum(bool(i.get("boom")) for i in items) == BOOM and all("answer" in i for i in items)
    own = {}
    for arm in ("base", "adapter"):
        answers = [x["answers"][arm] for x in doc["examples"]]
        graded = grade(mine, [{"output_text": a} for a in answers], items)
        own[arm] = np.array(graded.scores)
        got = doc["grader"]["arms"][arm]
        assert got["mean"] == pytest.approx(own[arm].mean(), abs=1e-12)
        assert doc["arms"][arm]["metrics"]["grader:score"] == pytest.approx(own[arm].mean())
        assert got["errors"] == graded.error_count == BOOM and got["n"] == N
        assert any("boom row" in r for r in got["error_reasons"])
        assert set(got["parts"]) == {"score", "sim", "length"}
        assert got["parts"]["sim"] == pytest.approx(np.mean(graded.parts["sim"]))
        per_example = [x["scores"][arm]["grader:score"] for x in doc["examples"]]
        assert per_example == pytest.approx(own[arm].tolist())
        assert sum(arm in x.get("grader_errors", {}) for x in doc["examples"]) == BOOM
    assert doc["grader"]["source"] == "eval.grader"
    # The random adapter answers differently, so the comparison has something to measure.
    assert any(x["answers"]["base"] != x["answers"]["adapter"] for x in doc["examples"])

    c = doc["comparisons"]["adapter"]["grader:score"]
    delta = float((own["adapter"] - own["base"]).mean())
    assert c["delta"] == pytest.approx(delta) and c["n"] == N
    assert c["base"] == pytest.approx(own["base"].mean())
    assert c["candidate"] == pytest.approx(own["adapter"].mean())
    assert c["ci_low"] <= c["delta"] <= c["ci_high"] and c["ci_low"] < c["ci_high"]
    assert c["test"] == "wilcoxon_signed_rank"  # a multi grader's score is continuous
    # No reference answer in prompt rows: no text metrics, and no crash; forgetting still runs.
    assert set(doc["comparisons"]["adapter"]) == {"grader:score"}
    assert set(doc["arms"]["base"]["metrics"]) == {"grader:score"}
    manifest = json.loads((grpo_run / "run.json").read_text())
    assert manifest["stages"]["eval"]["deltas"]["adapter"]["grader:score"]["delta"] == c["delta"]

    sentence = "Training stopped early at step 8"
    adapter_step = "adapter is the checkpoint of step 4"
    md = (grpo_run / "eval" / "report.md").read_text()
    assert sentence in md and adapter_step in md and "| grader:score ↑ |" in md
    assert f"base mean {report._fmt(own['base'].mean())}, {BOOM}/{N} errors" in md
    html = (grpo_run / "eval" / "report.html").read_text()
    assert sentence in html and adapter_step in html
    images = dict(
        re.findall(r"<img alt='(\w+)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    )
    assert set(images) == {"loss", "rewards", "deltas"}
    assert base64.b64decode(images["rewards"]).startswith(b"\x89PNG\r\n\x1a\n")
    assert "<th>item</th>" in html and "&quot;answer&quot;" in html
    assert sentence in out and "Grader score (multi" in out and "grader:score" in out


def test_reward_curves_and_notes_only_where_the_run_has_them(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"step": 1, "loss": 2.0},
                {"step": 2, "loss": 1.5, "reward": 0.2},
                {"step": 2, "eval_reward": 0.3, "eval_loss": 1.0},
                {"step": 3, "loss": 1.4, "reward": 0.25},
                {"step": 3, "loss": 1.3, "reward": 0.4},  # resumed: the last value of a step wins
            ]
        )
    )
    curves = plots.read_curves(metrics, ("reward", "eval_reward"))
    assert curves == {"reward": [(2, 0.2), (3, 0.4)], "eval_reward": [(2, 0.3)]}
    assert base64.b64decode(plots.reward_plot(curves)).startswith(b"\x89PNG")
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert plots.reward_plot(plots.read_curves(sft, ("reward", "eval_reward"))) is None

    assert report.read_training(tmp_path) is None  # not trained yet: nothing to say
    ran = {"early_stopping": {"stopped": False, "stopped_at": None}, "rewards": None}
    (tmp_path / "train_summary.json").write_text(json.dumps(ran))
    doc = {"run_dir": "r", "n_examples": 0, "comparisons": {}, "arms": {}, "examples": []}
    doc["training"] = report.read_training(tmp_path)
    md = report.write_markdown(doc, tmp_path).read_text()
    html = report.write_html(doc, tmp_path, {"rewards": None}, 5).read_text()
    assert "stopped early" not in md and "stopped early" not in html
    assert "GRPO reward" not in html and "Training reward" not in md


def test_rows_without_a_reference_are_answered_with_no_nll_pass(tiny_model):
    """A prompt row (reference "") beside a chat row and a general text in one batch: the prompt
    row is answered, scores 0 NLL over 0 tokens, and the others score as they do alone."""
    runner = ArmRunner(tiny_model, None, 6, False, 1.0, 0, 64)
    prompt = json.dumps([{"role": "user", "content": "What is 2 plus 2?"}])

    def batch(rows: list[tuple[str, str, str]]) -> dict:
        kind, prompts, refs = zip(*rows, strict=True)
        columns = {"kind": kind, "prompt": prompts, "reference": refs}
        return {"idx": np.arange(len(rows))} | {
            k: np.array(v, dtype=object) for k, v in columns.items()
        }

    forwards = []  # the rows of each NLL forward pass
    logits = runner.engine.logits
    runner.engine.logits = lambda ids, *rest: forwards.append(len(ids)) or logits(ids, *rest)
    rows = [("test", prompt, ""), ("test", prompt, "4"), ("text", "", "The sea is wide.")]
    assert runner(batch(rows[:1]))["n_tokens"][0] == 0 and forwards == []
    out = runner(batch(rows))
    assert forwards == [2]
    assert out["answer"][0] and out["answer"][0] == out["answer"][1]
    assert out["nll_sum"][0] == 0.0 and out["n_tokens"][0] == 0
    for i in (1, 2):
        alone = runner(batch([rows[i]]))
        assert out["n_tokens"][i] == alone["n_tokens"][0] > 0
        assert out["nll_sum"][i] == pytest.approx(alone["nll_sum"][0], rel=1e-4)


def test_chat_rows_give_the_grader_their_reference(tmp_path):
    (tmp_path / "data" / "test.parquet").mkdir(parents=True)
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"}]
    pq.write_table(
        pa.Table.from_pylist([{"id": "x", "messages": json.dumps(chat)}]),
        tmp_path / "data" / "test.parquet" / "p.parquet",
    )
    [e] = load_test_split(tmp_path)
    assert e.prompt == chat[:1] and e.reference == "a1" and e.item == {"reference": "a1"}


def test_a_bad_grader_fails_before_any_model_loads(tmp_path, tiny_model):
    write_prompts(tmp_path, {"test": [{"prompt": "hi", "answer": "1"}]})
    [e] = load_test_split(tmp_path)
    assert e.reference is None and e.item == {"answer": "1"}
    assert e.prompt == [{"role": "user", "content": "hi"}]
    bad = {"type": "string_check", "name": "x", "input": "{{sample.output_text}}",
           "reference": "{{item.answer}}", "operation": "equals"}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(_config(tmp_path, tiny_model, candidates=[tiny_model], grader=bad))
    )
    with pytest.raises(GraderError, match=r"eval\.grader\.operation: 'equals'"):
        evaluate(load_config(path))
    # Without eval.grader, a grpo run's own reward is the eval's grader.
    cfg = _config(tmp_path, tiny_model, candidates=[tiny_model])
    cfg["training"] = {"objective": "grpo", "grader": bad}
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(GraderError, match=r"training\.grader\.operation: 'equals'"):
        evaluate(load_config(path))
