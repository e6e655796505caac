"""`rayft eval` scores the answers `rayft serve` gives: for the same chats and arm, the greedy
text of eval's runner (Ray Data actors, as `rayft eval` runs them) equals the text of the
OpenAI-compatible API on a real local Ray Serve, character for character.

The adapter's greedy answers on the random tiny-llama start or end with whitespace (a space, or
bytes such as \\x1d that Python counts as whitespace), which a client receives as is: an eval
that trims its answers, or stops or renders prompts its own way, scores other text.
"""

from __future__ import annotations

import json

import pytest
from test_serve_api import free_port
from test_serve_units import make_adapter

from rayft.config import JobConfig
from rayft.evaluation.arms import base_arm, candidate_arm
from rayft.evaluation.generate import score_arm

pytestmark = pytest.mark.slow

KEY = "sk-test-agree"
MAX_TOKENS = 16
CHATS = [
    [{"role": "user", "content": "where is my order?"}],
    [{"role": "user", "content": "refund please"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "The sea was calm"},
    ],
    [{"role": "user", "content": "Ticket: ORDER-12345"}],
    [{"role": "user", "content": "reset my password"}],
]


@pytest.fixture(scope="module")
def server(ray_local, tiny_model, tmp_path_factory):
    from rayft.serving import start, stop

    run = tmp_path_factory.mktemp("agree_run")
    make_adapter(tiny_model, run / "adapter", seed=1)  # the run's own adapter, as eval finds it
    cfg = JobConfig(
        run_dir=str(run),
        model={"base": tiny_model},
        serve={
            "port": free_port(),
            "api_key": KEY,
            "adapters": {"adapter": str(run / "adapter")},
            "max_tokens_limit": 64,
            "cpus_per_replica": 0.5,  # leaves the session's Ray a CPU for eval's actor
        },
    )
    url = start(cfg)
    yield cfg, url
    stop()


def served(url: str, model: str) -> list[str]:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=KEY, max_retries=0)
    return [
        client.chat.completions.create(
            model=model, messages=chat, max_tokens=MAX_TOKENS, temperature=0
        )
        .choices[0]
        .message.content
        for chat in CHATS
    ]


def test_eval_answers_are_the_served_answers(server, tiny_model):
    cfg, url = server
    base = base_arm(tiny_model)
    arms = [base, candidate_arm("adapter", cfg.run_path, base.model, cfg.serve.max_lora_rank)]
    rows = [
        {"idx": i, "kind": "test", "prompt": json.dumps(chat), "reference": "x"}
        for i, chat in enumerate(CHATS)
    ]
    answers = {}
    for arm in arms:
        # batch_size 2: answers of left-padded batches, as eval runs them, not one by one.
        results = score_arm(
            rows,
            arm,
            max_new_tokens=MAX_TOKENS,
            max_lora_rank=cfg.serve.max_lora_rank,
            batch_size=2,
        )
        answers[arm.name] = [r["answer"] for r in results]
        assert answers[arm.name] == served(url, arm.name), arm.name
    assert answers["adapter"] != answers["base"]
    # What makes this test bite: text a trimming eval would have scored differently.
    assert any(a != a.strip() for a in answers["adapter"])
