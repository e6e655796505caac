"""lm-eval's `local-completions` model against `rayft serve`: the harness scores a served model
(base or adapter) through `/v1/completions` (`logprobs` + `echo` for log-likelihoods) as its own
`hf` model scores the same weights, and as `eval.lm_eval` does (tests/test_lm_eval.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lm_eval.api.instance import Instance
from test_lm_eval import copy_local_tasks
from test_serve_api import free_port
from test_serve_units import make_adapter

from rayft.adapters import fingerprint
from rayft.config import JobConfig
from rayft.evaluation.lm_eval import EngineLM, run_tasks
from rayft.serving.hf_engine import TransformersEngine

pytestmark = pytest.mark.slow

KEY = "sk-test-lm-eval"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> list[str]:
    return list(copy_local_tasks(tmp_path_factory.mktemp("lm_eval_tasks")).values())


@pytest.fixture(scope="module")
def server(ray_local, tiny_model, tmp_path_factory):
    from rayft.serving import start, stop

    run = tmp_path_factory.mktemp("lm_eval_serve")
    adapter = make_adapter(tiny_model, run / "a1", seed=3)
    cfg = JobConfig(
        run_dir=str(run),
        model={"base": tiny_model},
        serve={"port": free_port(), "api_key": KEY, "adapters": {"a1": str(adapter)}},
    )
    url = start(cfg)
    yield url, adapter
    stop()


def _served(url: str, model: str, tokenizer: str):
    from lm_eval.api.registry import get_model

    return get_model("local-completions")(
        base_url=f"{url}/completions",
        model=model,
        tokenizer_backend="huggingface",
        tokenizer=tokenizer,
        batch_size=4,
        max_retries=1,
    )


@pytest.mark.parametrize("model", ["base", "a1"])
def test_local_completions_scores_as_lm_evals_hf_model(
    server, tiny_model, tasks, model, monkeypatch
):
    from lm_eval.models.huggingface import HFLM

    url, adapter = server
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # what local-completions sends as its Bearer
    served = _served(url, model, tiny_model)
    peft = {"peft": str(adapter)} if model == "a1" else {}
    local = HFLM(pretrained=tiny_model, batch_size=8, device="cpu", **peft)
    got = run_tasks(served, tasks, limit=12, num_fewshot=None, bootstrap_iters=100)
    want = run_tasks(local, tasks, limit=12, num_fewshot=None, bootstrap_iters=100)
    for task in ("rayft_tiny_mc", "rayft_tiny_gen"):
        assert got[task]["per_doc"] == want[task]["per_doc"], task

    # The served log-likelihoods are the engine's, the ones `eval.lm_eval` scores with.
    engine = EngineLM(
        TransformersEngine(tiny_model),
        fingerprint(model, Path(adapter)) if model == "a1" else None,
        batch_size=4,
    )
    reqs = [
        Instance("loglikelihood", {}, ("Where is my order?", " It has shipped."), 0),
        Instance("loglikelihood", {}, ("The sky was", " blue"), 1),
    ]
    for (a, greedy_a), (b, greedy_b) in zip(
        served.loglikelihood(reqs), engine.loglikelihood(reqs), strict=True
    ):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
