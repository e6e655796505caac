"""`rayft eval` end to end on tiny-llama and a real local Ray, plus the LLM judge.

The candidate adapter is trained here with plain PEFT + torch for a few seconds to answer every
prompt with one fixed JSON object, so it is really better than the random base on the task.
The judge is a tiny OpenAI-compatible HTTP server on 127.0.0.1 that decides deterministically.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from test_serve_units import make_adapter

from rayft import cli
from rayft.evaluation.judge import judge_pairs, parse_verdict

ANSWER = '{"category": "shipping"}'


# --------------------------------------------------------------------------- judge server


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _verdict(prompt: str, mode: str) -> str:
    if mode == "always_a":  # pure position bias
        return "A"
    a = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]", prompt, re.S).group(1)
    b = re.search(r"\[Answer B\]\n(.*?)\n\nReply with", prompt, re.S).group(1)
    if _is_json(a) == _is_json(b):
        return "TIE"
    return "A" if _is_json(a) else "B"


def _server(mode: str) -> tuple[ThreadingHTTPServer, list[str]]:
    calls: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][-1]["content"]
            calls.append(prompt)
            reply = {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": _verdict(prompt, mode)},
                    }
                ],
            }
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, calls


@pytest.fixture
def judge_server():
    servers = []

    def start(mode: str) -> tuple[str, list[str]]:
        server, calls = _server(mode)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/v1", calls

    yield start
    for s in servers:
        s.shutdown()


def test_judge_swaps_positions_to_cancel_order_bias(judge_server):
    prompts, refs = ["p1", "p2", "p3"], [ANSWER] * 3
    base = ["garbage", ANSWER, "same"]
    cand = [ANSWER, "garbage", "same"]
    url, calls = judge_server("prefers_json")
    scores = judge_pairs(prompts, refs, base, cand, base_url=url, model="j", api_key_env="NO_KEY")
    assert scores == [1.0, 0.0, 0.5]
    assert len(calls) == 4  # two orders for each differing pair, none for identical answers
    url, _ = judge_server("always_a")
    biased = judge_pairs(prompts, refs, base, cand, base_url=url, model="j", api_key_env="NO_KEY")
    assert biased == [0.5, 0.5, 0.5]
    assert parse_verdict(" b.") == "B" and parse_verdict("Tie") == "TIE"
    assert parse_verdict("no idea") == "TIE"


# --------------------------------------------------------------------------- run dir


def _examples() -> list[tuple[list[dict], str]]:
    topics = ["order", "parcel", "refund", "invoice", "password", "login"]
    out = []
    for i in range(12):
        prompt = [
            {"role": "system", "content": "Answer with JSON."},
            # Markup in the data: report.html must show it, not render it.
            {"role": "user", "content": f"Ticket {i}: my <b>{topics[i % 6]}</b> is late & lost"},
        ]
        out.append((prompt, ANSWER))
    return out


def _train_adapter(model_dir: str, examples: list, out: str) -> None:
    """LoRA on the fixed answer with plain PEFT + torch: a candidate that is really better."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        # lm_head too: with the 64-dim random tiny-llama, "all-linear" (which leaves lm_head
        # out) plateaus near loss 4.9 instead of learning the answer.
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"],
        ),
    )
    seqs, labels = [], []
    for prompt, answer in examples:
        text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        p = tok(text, add_special_tokens=False)["input_ids"]
        a = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
    mask = (ids != tok.pad_token_id).long()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(50):
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.1, loss.item()
    model.save_pretrained(out)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model):
    run = tmp_path_factory.mktemp("evalrun")
    examples = _examples()
    (run / "data" / "test.parquet").mkdir(parents=True)
    rows = [
        {
            "id": f"ex{i:02d}",
            "source": f"t.jsonl:{i + 1}",
            "kind": "sft",
            "messages": json.dumps([*prompt, {"role": "assistant", "content": answer}]),
        }
        for i, (prompt, answer) in enumerate(examples)
    ]
    # Two files, as Ray Data writes them: the reader must take the whole directory.
    pq.write_table(pa.Table.from_pylist(rows[:5]), run / "data" / "test.parquet" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[5:]), run / "data" / "test.parquet" / "b.parquet")
    _train_adapter(tiny_model, examples, str(run / "adapter"))
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, 11):
            f.write(json.dumps({"step": step, "loss": 3.0 / step}) + "\n")
            if step % 5 == 0:
                f.write(json.dumps({"step": step, "eval_loss": 3.2 / step}) + "\n")
    return run


@pytest.mark.slow
def test_eval_end_to_end(run_dir, tiny_model, ray_local, judge_server, capsys):
    url, calls = judge_server("prefers_json")
    cfg = {
        "name": "evaltest",
        "run_dir": str(run_dir),
        "model": {"base": tiny_model},
        "eval": {
            # A trained adapter, and the base model itself as a second candidate (identical arm).
            "candidates": ["adapter", tiny_model],
            "max_new_tokens": 12,
            "batch_size": 4,
            "num_replicas": 2,
            "bootstrap_samples": 500,
            "checks": [
                {"name": "valid_json", "kind": "json_keys", "keys": ["category"]},
                {"name": "shipping", "kind": "contains", "pattern": "shipping"},
            ],
            "judge": {"base_url": url, "model": "judge", "api_key_env": "RAYFT_TEST_NO_KEY"},
        },
    }
    path = run_dir / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["eval", str(path)]) == 0

    out = capsys.readouterr().out
    out = out.replace("\n", "")  # rich folds long paths
    assert "adapter vs base" in out and str(run_dir / "eval" / "report.html") in out
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["n_examples"] == 12 and report["n_general_texts"] >= 30

    better = report["comparisons"]["adapter"]
    for metric in ("exact_match", "check:valid_json", "check:shipping", "token_f1", "judge"):
        c = better[metric]
        assert c["delta"] > 0 and c["ci_low"] > 0 and c["p_value"] < 0.01, (metric, c)
    assert better["exact_match"]["candidate"] == 1.0 and better["exact_match"]["base"] == 0.0
    assert better["exact_match"]["test"] == "mcnemar_exact"
    assert better["nll"]["delta"] < 0 and better["nll"]["ci_high"] < 0
    assert report["arms"]["adapter"]["metrics"]["perplexity"] < 1.5
    assert report["arms"]["base"]["metrics"]["perplexity"] > 100  # random init: ~vocab size
    assert better["general_nll"]["n"] == report["n_general_texts"]
    assert len(calls) == 2 * 12  # every pair differs; each judged in both orders

    same = report["comparisons"][tiny_model]
    for metric, c in same.items():
        assert c["delta"] == 0 and c["ci_low"] <= 0 <= c["ci_high"], (metric, c)
        assert c["p_value"] == 1.0 and c["ties"] == 12 or metric == "general_nll"
    assert {"delta", "ci_low", "ci_high", "p_value"} <= set(same["general_nll"])
    arms = report["arms"]
    assert (
        arms["base"]["metrics"]["general_perplexity"]
        == arms[tiny_model]["metrics"]["general_perplexity"]
    )
    ex = report["examples"][0]
    assert ex["answers"]["adapter"] == ANSWER and ex["reference"] == ANSWER
    assert ex["scores"]["adapter"]["exact_match"] == 1.0

    html = (run_dir / "eval" / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(images) == 2  # loss curves and deltas with CIs
    assert all(base64.b64decode(img).startswith(b"\x89PNG\r\n\x1a\n") for img in images)
    assert "&lt;b&gt;order&lt;/b&gt; is late &amp; lost" in html and "<b>order" not in html
    assert html.count("<tr>") >= 12 + 1  # the differing examples are all shown
    md = (run_dir / "eval" / "report.md").read_text()
    assert "## adapter vs base" in md and "| exact_match ↑ |" in md
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["stages"]["eval"]["deltas"]["adapter"]["exact_match"]["delta"] == 1.0


def test_eval_errors_say_what_to_do(tmp_path, tiny_model):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path), "model": {"base": tiny_model}}))
    from rayft.config import load_config
    from rayft.evaluation import EvalError, evaluate

    with pytest.raises(EvalError, match=r"test.parquet: no test split; run `rayft prepare`"):
        evaluate(load_config(path))
    (tmp_path / "data" / "test.parquet").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(
            [{"id": "a", "messages": json.dumps([{"role": "user", "content": "q"}])}]
        ),
        tmp_path / "data" / "test.parquet" / "x.parquet",
    )
    with pytest.raises(EvalError, match="no assistant turn"):
        evaluate(load_config(path))
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "id": "a",
                    "messages": json.dumps(
                        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
                    ),
                }
            ]
        ),
        tmp_path / "data" / "test.parquet" / "x.parquet",
    )
    with pytest.raises(EvalError, match="run `rayft train`.*or remove 'adapter'"):
        evaluate(load_config(path))
    assert cli.main(["eval", str(path)]) == 2  # the CLI prints the message, no traceback
    # An adapter the server would refuse has no served answers to score: refused before Ray.
    make_adapter(tiny_model, tmp_path / "adapter", seed=0, r=8)
    cfg = load_config(path, ["serve.max_lora_rank=4"])
    with pytest.raises(EvalError, match=r"'adapter': .*rank 8 is above serve.max_lora_rank=4"):
        evaluate(cfg)
