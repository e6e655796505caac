"""`eval.lm_eval`: lm-evaluation-harness tasks through the serving engine (EngineLM).

The local tasks (tests/data/lm_eval/) name their data files relative to the repository root,
as lm-eval reads them (from the working directory): the tests copy them with absolute paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from lm_eval.api.instance import Instance
from test_serve_units import make_adapter

from rayft import cli
from rayft.adapters import fingerprint
from rayft.config import ConfigError, load_config
from rayft.evaluation.lm_eval import EngineLM, run_tasks
from rayft.serving.hf_engine import TransformersEngine

DATA = Path(__file__).parent / "data" / "lm_eval"


def copy_local_tasks(out: Path) -> dict[str, str]:
    """The local tasks in `out`, reading their data files by absolute path."""
    tasks = {}
    for kind in ("mc", "gen"):
        text = (DATA / f"tiny_{kind}.yaml").read_text()
        (out / f"tiny_{kind}.yaml").write_text(text.replace("tests/data/lm_eval/", f"{DATA}/"))
        tasks[kind] = str(out / f"tiny_{kind}.yaml")
    return tasks


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory) -> dict[str, str]:
    return copy_local_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("lm_eval_adapter") / "a", seed=3)


def _direct_logprob(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """Teacher-forced log P(continuation | context) of one unpadded sequence."""
    ctx = tok(context)["input_ids"]
    cont = tok(context + continuation)["input_ids"][len(ctx) :]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(ctx) - 1 : -1], -1)
    target = torch.tensor(cont)
    picked = logprobs.gather(1, target[:, None]).sum().item()
    return picked, bool((logprobs.argmax(-1) == target).all())


@pytest.mark.parametrize("with_adapter", [False, True])
def test_loglikelihood_is_the_teacher_forced_logprob(tiny_model, adapter, with_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = TransformersEngine(tiny_model)
    ref = fingerprint("a", adapter) if with_adapter else None
    lm = EngineLM(engine, ref, batch_size=3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    if with_adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    # Lengths differ (padding within a batch), two requests share their input (one-token
    # continuations of one context), and a context's trailing space moves to the continuation.
    pairs = [
        ("Where is my order?", " It has shipped and will arrive soon."),
        ("The sky was", " blue"),
        ("The sky was", " red"),
        ("The sky was ", "blue"),
        ("Ticket: ORDER-12345. Status:", " shipped. Category: billing."),
        ("Q: 2 + 3 =\nA:", " 5"),
    ]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs)
    for (context, continuation), (logprob, greedy) in zip(pairs, got, strict=True):
        # lm-eval's rule: a context's trailing spaces are scored as part of the continuation.
        bare = context.rstrip(" ")
        want, want_greedy = _direct_logprob(model, tok, bare, context[len(bare) :] + continuation)
        assert logprob == pytest.approx(want, abs=1e-4), (context, continuation)
        assert greedy == want_greedy
    assert got[1] != got[2]
    assert got[3] == pytest.approx(got[1], abs=1e-5)  # "was " + "blue" is "was" + " blue"
    # An empty context conditions on the prefix token (no BOS here: the end token).
    [(logprob, _)] = lm.loglikelihood([Instance("loglikelihood", {}, ("", "The sky"), 0)])
    cont = tok("The sky", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[tok.eos_token_id, *cont]])).logits[0]
    want = torch.log_softmax(logits[:-1].float(), -1).gather(1, torch.tensor(cont)[:, None])
    assert logprob == pytest.approx(want.sum().item(), abs=1e-4)


@pytest.mark.parametrize(
    "model, with_adapter",
    [
        ("tiny-llama", False),
        ("tiny-llama", True),
        # A real model: tiny-llama's random weights leave many choices near a tie.
        pytest.param("smollm2-135m-instruct", False, marks=pytest.mark.slow),
    ],
)
def test_task_scores_match_lm_evals_hf_model(adapter, local_tasks, model, with_adapter):
    """The same accuracy, document by document, as lm-eval's own `hf` model on the same
    weights (and the same answers on the generation task)."""
    from lm_eval.models.huggingface import HFLM

    from rayft import models

    path = str(models.pull(model))
    engine = TransformersEngine(path)
    ours = EngineLM(engine, fingerprint("a", adapter) if with_adapter else None, batch_size=8)
    peft = {"peft": str(adapter)} if with_adapter else {}
    theirs = HFLM(pretrained=path, batch_size=8, device="cpu", **peft)
    tasks = [local_tasks["mc"], local_tasks["gen"]]
    got = run_tasks(ours, tasks, limit=12, num_fewshot=None, bootstrap_iters=100)
    want = run_tasks(theirs, tasks, limit=12, num_fewshot=None, bootstrap_iters=100)
    mc = got["rayft_tiny_mc"]
    assert mc["n"] == 12 and set(mc["metrics"]) == {"acc", "acc_norm"}
    for task in ("rayft_tiny_mc", "rayft_tiny_gen"):
        assert got[task]["per_doc"] == want[task]["per_doc"], task
        assert got[task]["metrics"] == pytest.approx(want[task]["metrics"])
    reqs = [
        Instance("generate_until", {}, (f"Q: {q} =\nA:", {"until": ["\n"], "max_gen_toks": 6}), i)
        for i, q in enumerate(["2 + 3", "10 - 3", "Where is my order?"])
    ]
    assert ours.generate_until(reqs) == theirs.generate_until(reqs)


def test_generation_settings_the_engine_cannot_honour_are_refused(tiny_model):
    from rayft.evaluation.testset import EvalError

    lm = EngineLM(TransformersEngine(tiny_model), None, batch_size=2)
    req = Instance("generate_until", {}, ("Q:", {"until": ["\n"], "num_beams": 4}), 0)
    req.task_name = "beamy"
    with pytest.raises(EvalError, match=r"'beamy' asks for generation settings .*num_beams"):
        lm.generate_until([req])


def test_lm_eval_config_is_checked(tmp_path, local_tasks):
    ok = load_config(None, [f"eval.lm_eval={json.dumps({'tasks': ['arc_easy']})}"])
    assert ok.eval.lm_eval.limit is None and ok.eval.lm_eval.num_fewshot is None
    bad = {
        "tasks: []": {"tasks": []},
        "limit": {"tasks": ["arc_easy"], "limit": 0},
        "num_fewshot": {"tasks": ["arc_easy"], "num_fewshot": -1},
        "does not exist": {"tasks": [str(tmp_path / "nope.yaml")]},
        "each task once": {"tasks": [local_tasks["mc"], local_tasks["mc"]]},
    }
    for what, section in bad.items():
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump({"eval": {"lm_eval": section}}))
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert "lm_eval" in str(e.value), (what, str(e.value))
        if what in ("does not exist", "each task once"):
            assert what in str(e.value)


@pytest.mark.slow  # Ray, and the test split scored as well: ~30 s on 2 idle cores
def test_eval_reports_lm_eval_tasks_with_paired_intervals(
    tmp_path, tiny_model, local_tasks, ray_local, capsys
):
    run = tmp_path / "run"
    (run / "data" / "test.parquet").mkdir(parents=True)
    rows = [
        {
            "id": f"ex{i}",
            "source": f"t.jsonl:{i + 1}",
            "kind": "sft",
            "messages": json.dumps(
                [{"role": "user", "content": q}, {"role": "assistant", "content": "yes"}]
            ),
        }
        for i, q in enumerate(["Is it shipped?", "Where is my order?"])
    ]
    pq.write_table(pa.Table.from_pylist(rows), run / "data" / "test.parquet" / "a.parquet")
    make_adapter(tiny_model, run / "adapter", seed=3)
    cfg = {
        "name": "lmeval",
        "run_dir": str(run),
        "model": {"base": tiny_model},
        "eval": {
            "candidates": ["adapter"],
            "max_new_tokens": 2,
            "forgetting": False,
            "bootstrap_samples": 200,
            "lm_eval": {
                "tasks": [local_tasks["mc"], local_tasks["gen"]],
                "limit": 10,
                "num_fewshot": 1,
            },
        },
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["eval", str(path)]) == 0

    report = json.loads((run / "eval" / "report.json").read_text())
    tasks = report["lm_eval"]["tasks"]
    assert set(tasks) == {"rayft_tiny_mc", "rayft_tiny_gen"}
    mc = tasks["rayft_tiny_mc"]
    assert mc["n"] == 10 and mc["num_fewshot"] == 1
    assert set(mc["metrics"]) == {"base", "adapter"}
    for metric in ("acc", "acc_norm"):
        c = mc["comparisons"]["adapter"][metric]
        assert c["n"] == 10 and c["test"] == "mcnemar_exact"
        assert c["base"] == mc["metrics"]["base"][metric]
        assert c["candidate"] == mc["metrics"]["adapter"][metric]
        assert c["ci_low"] <= c["delta"] <= c["ci_high"]
        assert c["wins"] + c["ties"] + c["losses"] == 10
    # The random adapter changes the model: its scores are not the base's.
    assert mc["comparisons"]["adapter"]["acc"]["ties"] < 10 or (
        mc["metrics"]["base"] != mc["metrics"]["adapter"]
    )
    gen = tasks["rayft_tiny_gen"]["comparisons"]["adapter"]["exact_match"]
    assert gen["n"] == 10 and {"ci_low", "ci_high", "p_value"} <= set(gen)

    md = (run / "eval" / "report.md").read_text()
    assert "### adapter vs base: lm-eval tasks" in md and "| rayft_tiny_mc acc ↑ |" in md
    html = (run / "eval" / "report.html").read_text()
    assert "adapter vs base: lm-eval tasks" in html and "rayft_tiny_gen exact_match" in html
    manifest = json.loads((run / "run.json").read_text())
    assert "lm_eval:rayft_tiny_mc/acc" in manifest["stages"]["eval"]["deltas"]["adapter"]
    out = capsys.readouterr().out.replace("\n", "")
    assert "[rayft eval] lm-eval base: rayft_tiny_mc acc" in out
    assert "adapter vs base: lm-eval tasks" in out


def test_unknown_task_names_are_refused_before_any_arm_starts():
    from rayft.evaluation.lm_eval import check_names
    from rayft.evaluation.testset import EvalError

    # Files are not names; arc_easy is one lm-eval ships (its index takes seconds: one call).
    with pytest.raises(EvalError, match=r"'arc_esy' is not a task.*did you mean arc_easy"):
        check_names([str(DATA / "tiny_mc.yaml"), "arc_easy", "arc_esy"])
