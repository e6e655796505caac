"""Unit tests of the eval metrics, task checks and paired statistics (no Ray, no model)."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest

from rayft.config import CheckConfig, ConfigError, load_config
from rayft.evaluation.checks import run_check
from rayft.evaluation.metrics import (
    corpus_bleu,
    exact_match,
    rouge_l,
    sentence_bleu,
    token_f1,
)
from rayft.evaluation.plots import loss_plot, read_loss_curves
from rayft.evaluation.stats import bootstrap_ci, paired_compare
from rayft.evaluation.testset import load_general_text


def test_text_metrics_against_hand_computed_values():
    assert exact_match(" a  b\n", "a b") == 1.0
    assert exact_match("a b", "a c") == 0.0
    # overlap {the, cat}: P = 2/3, R = 2/4 -> F1 = 4/7
    assert token_f1("the cat sat", "The cat ran away") == pytest.approx(4 / 7)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    # LCS("the cat sat on the mat", "the cat on the mat") = 5: P = 5/6, R = 1 -> F = 10/11
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, no brevity penalty -> (1/12) ** (1/4)
    assert sentence_bleu("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(
        100 * (1 / 12) ** 0.25, abs=1e-6
    )
    assert sentence_bleu("x y z", "the cat") == 0.0
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)


def test_task_checks():
    keys = CheckConfig(name="j", kind="json_keys", keys=["category", "reply"])
    assert run_check(keys, ' {"category": "billing", "reply": "hi", "x": 1} ')
    assert not run_check(keys, '{"category": "billing"}')  # a key missing
    assert not run_check(keys, 'Sure! {"category": "billing", "reply": "hi"}')  # not just JSON
    assert not run_check(keys, '["category", "reply"]')  # JSON, but not an object
    regex = CheckConfig(name="r", kind="regex", pattern=r'"category":\s*"(billing|shipping)"')
    assert run_check(regex, '{"category":  "shipping"}') and not run_check(
        regex, '{"category": "x"}'
    )
    contains = CheckConfig(name="c", kind="contains", pattern="refund")
    assert run_check(contains, "a refund is on its way") and not run_check(contains, "no")


def test_check_config_errors_name_the_check():
    with pytest.raises(ConfigError, match="check 'bad'.*needs a pattern"):
        load_config(None, ["eval.checks=[{name: bad, kind: regex}]"])
    with pytest.raises(ConfigError, match="bad regex"):
        load_config(None, ["eval.checks=[{name: r, kind: regex, pattern: '(unclosed'}]"])
    with pytest.raises(ConfigError, match="needs keys"):
        load_config(None, ["eval.checks=[{name: j, kind: json_keys}]"])


def test_identical_arms_are_not_different():
    scores = np.random.default_rng(1).random(40)
    for kind in ("continuous", "binary"):
        values = scores if kind == "continuous" else (scores > 0.5).astype(float)
        c = paired_compare(values, values.copy(), kind=kind)
        assert c["delta"] == 0 and c["ci_low"] <= 0 <= c["ci_high"]
        assert c["p_value"] == 1.0 and c["ties"] == 40 and c["wins"] == c["losses"] == 0


def test_arms_equal_in_distribution_are_not_significant():
    rng = np.random.default_rng(7)
    base = rng.normal(size=60)
    cand = base + rng.normal(scale=0.5, size=60) * rng.choice([-1, 1], size=60)
    cand -= (cand - base).mean()  # no true difference at all
    c = paired_compare(base, cand)
    assert c["ci_low"] < 0 < c["ci_high"] and c["p_value"] > 0.5


def test_clearly_better_arm_is_detected():
    rng = np.random.default_rng(3)
    base = rng.random(30)
    cand = base + 0.2 + rng.normal(scale=0.05, size=30)
    c = paired_compare(base, cand, samples=1000, seed=5)
    assert c["ci_low"] > 0.15 and c["ci_high"] < 0.25 and c["p_value"] < 1e-4
    assert c["wins"] == 30 and c["test"] == "wilcoxon_signed_rank"
    # Lower-is-better metrics (NLL) count a decrease as a win.
    nll = paired_compare(base, base - 0.3, higher_is_better=False)
    assert nll["delta"] == pytest.approx(-0.3) and nll["wins"] == 30 and nll["ci_high"] < 0


def test_significance_tests_against_hand_computed_p_values():
    # Exact McNemar: 1 pair only base got right, 7 only the candidate -> 2 * 9 / 2**8.
    base = np.array([1, 0, 0, 0, 0, 0, 0, 0, 1, 0], dtype=float)
    cand = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=float)
    c = paired_compare(base, cand, kind="binary")
    assert c["test"] == "mcnemar_exact" and c["p_value"] == pytest.approx(2 * 9 / 256)
    assert (c["wins"], c["ties"], c["losses"]) == (7, 2, 1)
    assert c["delta"] == pytest.approx(0.6)
    # Wilcoxon signed-rank, 5 positive differences: exact two-sided p = 2 / 2**5.
    w = paired_compare(np.zeros(5), np.array([1.0, 2, 3, 4, 5]))
    assert w["p_value"] == pytest.approx(2 / 32)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    diffs = np.random.default_rng(0).normal(1.0, 1.0, size=50)
    a, b = bootstrap_ci(diffs, 2000, seed=11), bootstrap_ci(diffs, 2000, seed=11)
    assert a == b and a[0] < diffs.mean() < a[1]
    # A 95% interval of a mean of 50 draws with sd 1 is about +-1.96 / sqrt(50) wide.
    assert (a[1] - a[0]) / 2 == pytest.approx(1.96 * diffs.std() / math.sqrt(50), rel=0.2)


def test_general_text_set_ships_with_the_package():
    texts = load_general_text()
    assert len(texts) >= 30 and len(set(texts)) == len(texts)
    assert all(len(t.split()) >= 40 for t in texts)


def test_loss_curves_keep_the_last_value_of_a_replayed_step(tmp_path):
    rows = [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.0},
        {"step": 2, "eval_loss": 2.5},
        {"step": 2, "loss": 1.9},  # replayed after a resume from step 1
        {"step": 3, "loss": 1.5, "learning_rate": 1e-4},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    curves = read_loss_curves(path)
    assert curves == {"loss": [(1, 3.0), (2, 1.9), (3, 1.5)], "eval_loss": [(2, 2.5)]}
    assert read_loss_curves(tmp_path / "missing.jsonl") == {"loss": [], "eval_loss": []}
    png = base64.b64decode(loss_plot(curves))
    assert png.startswith(b"\x89PNG") and loss_plot(read_loss_curves(tmp_path / "x")) is None
