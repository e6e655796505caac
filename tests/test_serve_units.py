"""Serving parts without Ray: adapter vetting, engine batching, arm assignment, routing, the A/B
report."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rayft.adapters import (
    AdapterError,
    base_linears,
    check_compatible,
    fingerprint,
    resolve_adapter,
)
from rayft.serving.ab import assign, report
from rayft.serving.errors import AdapterRefused, NotFound
from rayft.serving.routing import resolve

# --------------------------------------------------------------- helpers (also used by
# test_serve_api): adapters and merged models made with PEFT on tiny-llama. LoRA B starts at
# zero (an adapter that changes nothing), so B gets random values: answers must differ.


def make_adapter(base: str, out: Path, seed: int, r: int = 4, dora: bool = False) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], use_dora=dora)
    model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    model.save_pretrained(out)
    return out


def make_merged(base: str, adapter: Path, out: Path) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    model.merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def native_answer(base: str, adapter: Path, ids: list[int], max_tokens: int) -> str:
    """Greedy answer of base + adapter through PEFT's own (unmerged) layers: the reference a
    merged fallback must reproduce."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )[0, len(ids) :].tolist()
    if tok.eos_token_id in out:
        out = out[: out.index(tok.eos_token_id)]
    return tok.decode(out, skip_special_tokens=True)


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    outside = tmp_path_factory.mktemp("outside")
    make_adapter(tiny_model, root / "runs" / "r1" / "adapter", seed=1)
    make_adapter(tiny_model, outside / "evil", seed=2)
    return root, outside


def test_run_dir_resolves_to_its_adapter(adapters, tmp_path):
    root, _ = adapters
    path = resolve_adapter("runs/r1", root, tmp_path)
    assert path == (root / "runs" / "r1" / "adapter").resolve()
    assert resolve_adapter(str(root / "runs" / "r1"), root, tmp_path) == path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink_dir", "symlink_file"])
def test_paths_outside_the_root_are_refused(adapters, tmp_path, kind):
    root, outside = adapters
    if kind == "dotdot":
        spec = f"runs/../../{outside.name}/evil"
    elif kind == "absolute":
        spec = str(outside / "evil")
    elif kind == "symlink_dir":
        link = root / "link_dir"
        link.unlink(missing_ok=True)
        link.symlink_to(outside / "evil")
        spec = "link_dir"
    else:  # a real directory under the root whose weights file points outside
        d = root / "link_file"
        d.mkdir(exist_ok=True)
        (d / "adapter_config.json").write_text(
            (outside / "evil" / "adapter_config.json").read_text()
        )
        w = d / "adapter_model.safetensors"
        w.unlink(missing_ok=True)
        w.symlink_to(outside / "evil" / "adapter_model.safetensors")
        spec = "link_file"
    with pytest.raises(AdapterError, match=r"\.\.|outside the allowed root"):
        resolve_adapter(spec, root, tmp_path)


def test_pickle_only_adapter_is_refused(adapters, tmp_path):
    root, _ = adapters
    d = root / "pickled"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(
        (root / "runs/r1/adapter/adapter_config.json").read_text()
    )
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterError, match="pickle"):
        resolve_adapter("pickled", root, tmp_path)


def test_compatibility_is_checked_on_shapes_and_rank(tiny_model, adapters, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root, _ = adapters
    linears = base_linears(tiny_model)
    ok = check_compatible(root / "runs/r1/adapter", linears, max_rank=64)
    assert ok == {"rank": 4, "modules": 4, "dora": False}
    with pytest.raises(AdapterError, match="rank 4 is above"):
        check_compatible(root / "runs/r1/adapter", linears, max_rank=2)
    # An adapter trained on a model with other dimensions must not load onto tiny-llama.
    other = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
        )
    )
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "o"
    )
    with pytest.raises(AdapterError, match="in the adapter but"):
        check_compatible(tmp_path / "o", linears, max_rank=64)


def test_fingerprint_changes_with_the_weights(adapters):
    root, _ = adapters
    path = root / "runs/r1/adapter"
    before = fingerprint("a", path)
    w = path / "adapter_model.safetensors"
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 1_000_000))
    assert fingerprint("a", path).key != before.key


def test_assignment_is_sticky_and_proportional():
    arms = {"base": 3.0, "ft": 1.0}
    users = [f"user-{i}" for i in range(4000)]
    first = [assign("exp", arms, u) for u in users]
    assert first == [assign("exp", arms, u) for u in users]  # sticky
    share = Counter(first)["ft"] / len(users)
    assert abs(share - 0.25) < 0.03, share
    random.seed(0)
    anon = Counter(assign("exp", arms, None) for _ in range(4000))
    assert abs(anon["ft"] / 4000 - 0.25) < 0.03
    assert Counter(assign("exp", {"base": 1.0, "off": 0.0}, u) for u in users)["off"] == 0


def test_routing_names(tmp_path):
    from rayft.serving.protocol import AdapterRef

    ref = AdapterRef("a1", "/x", "k")
    kw = dict(
        base_names=("base", "tiny-llama"),
        engines={"m1"},
        adapters={"a1": ref},
        experiments={"exp": {"arms": {"a1": 1.0}, "shadow": "base"}},
        user="u",
    )
    assert resolve("base", **kw)[0].adapter is None
    assert resolve("tiny-llama", **kw)[0].engine == "base"
    assert resolve("tiny-llama:a1", **kw)[0].adapter == ref
    assert resolve("base:a1", **kw)[0].arm == "a1"
    assert resolve("m1", **kw)[0].engine == "m1"
    answer, shadow = resolve("exp", **kw)
    assert (answer.arm, answer.experiment, shadow.arm) == ("a1", "exp", "base")
    with pytest.raises(NotFound, match="does not exist"):
        resolve("nope", **kw)


def test_report_win_rates_ratings_and_tests(tmp_path):
    reqs, fb = [], []
    for i in range(60):
        arm = "base" if i % 2 else "ft"
        reqs.append(
            {
                "id": f"r{i}",
                "experiment": "exp",
                "arm": arm,
                "status": 200,
                "latency_s": 0.1,
                "completion_tokens": 5,
            }
        )
        fb.append(
            {
                "response_id": f"r{i}",
                "rating": 4.0 + (i % 3) / 2 if arm == "ft" else 2.0 + (i % 3) / 2,
            }
        )
    for i in range(0, 60, 2):  # ft (even ids) preferred to base in 24 of 30 comparisons
        win, lose = (f"r{i}", f"r{i + 1}") if i < 48 else (f"r{i + 1}", f"r{i}")
        fb.append({"response_id": win, "preferred_over": lose})
    reqs.append({"id": "s", "experiment": "exp", "arm": "shadow", "shadow": True, "status": 200})
    out = report(reqs, fb)["exp"]
    assert out["reference"] == "base" and set(out["arms"]) == {"base", "ft"}
    assert out["arms"]["ft"]["requests"] == 30
    r = out["arms"]["ft"]["rating"]
    assert r["n"] == 30 and r["mean"] == pytest.approx(4.5)
    assert r["ci"][0] < r["mean"] < r["ci"][1]
    assert out["arms"]["ft"]["rating_vs_base"]["p_value"] < 1e-6
    (pair,) = out["pairwise"]
    assert (pair["arm"], pair["versus"], pair["wins"], pair["losses"]) == ("ft", "base", 24, 6)
    assert pair["ci"][0] < 0.8 < pair["ci"][1] and pair["p_value"] < 0.01
    json.dumps(out)  # the report is written as JSON


def test_engine_mixed_batch_matches_single_requests_with_dora_and_eviction(tiny_model, tmp_path):
    from rayft.serving.hf_engine import TransformersEngine
    from rayft.serving.protocol import Delta, GenRequest, GenResult

    refs = [
        fingerprint(f"a{i}", make_adapter(tiny_model, tmp_path / f"a{i}", seed=i, dora=i == 2))
        for i in range(3)
    ]
    engine = TransformersEngine(tiny_model, max_loaded_adapters=1)
    ids = engine.tokenizer("hello world")["input_ids"]
    batch = [GenRequest(ids, 6, 0.0, adapter=r) for r in [None, *refs]]
    mixed = [r.text for r in engine.generate(batch)]
    assert len(set(mixed)) == 4  # base, two LoRA adapters and a DoRA adapter all differ
    single = [engine.generate([req])[0].text for req in batch]  # evicts and reloads (max 1)
    assert single == mixed
    assert len(engine.loaded_adapters()) == 1
    # Streams share the batch with plain requests: the same answers, piece by piece.
    streamed = [replace(r, stream=i % 2 == 1) for i, r in enumerate(batch)]
    steps = list(engine.stream_batch(streamed))
    assert all(len(step) == len(batch) for step in steps) and len(steps) > 3
    for i, r in enumerate(streamed):
        entries = [step[i] for step in steps]
        summary = next(e for e in entries if isinstance(e, GenResult))
        pieces = entries[: entries.index(summary)]
        assert all(isinstance(p, Delta) for p in pieces)
        assert set(entries[len(pieces) + 1 :]) <= {None}
        assert (summary.text, summary.completion_tokens) == (mixed[i], 6)
        assert "".join(p.text for p in pieces) == (mixed[i] if r.stream else "")
    stop = mixed[1][3:5]  # a stop string inside the answer ends it there
    entries = [s[0] for s in engine.stream_batch([replace(streamed[1], stop=[stop])])]
    text = "".join(e.text for e in entries if isinstance(e, Delta))
    assert text == mixed[1][: mixed[1].index(stop)]
    assert entries[-1].finish_reason == "stop"
    # An adapter whose files vanished fails its own request only, with a clear error.
    gone = fingerprint("gone", make_adapter(tiny_model, tmp_path / "gone", seed=9))
    shutil.rmtree(gone.path)
    out = engine.generate([batch[0], GenRequest(ids, 6, 0.0, adapter=gone)])
    assert out[0].text == mixed[0]
    assert isinstance(out[1], AdapterRefused) and "gone" in str(out[1])
    restored = pickle.loads(pickle.dumps(out[1]))
    assert (restored.status, restored.param) == (400, out[1].param)


def test_vllm_engine_missing_says_how_to_install(tiny_model, tmp_path):
    from rayft.config import JobConfig
    from rayft.serving import build_app
    from rayft.serving.vllm_engine import VllmMissing

    cfg = JobConfig(run_dir=str(tmp_path), model={"base": tiny_model}, serve={"engine": "vllm"})
    with pytest.raises(VllmMissing, match=r"pip install rayft\[vllm\]"):
        build_app(cfg)


def test_stacked_lora_equals_peft_mixed_batch(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayft.serving.lora_batch import LoraStacks

    a = make_adapter(tiny_model, tmp_path / "a", seed=1, r=4)
    b = make_adapter(tiny_model, tmp_path / "b", seed=2, r=8)  # ranks differ: zero padding
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), a, adapter_name="a"
    )
    model.load_adapter(b, adapter_name="b")
    model.eval()
    stacks = LoraStacks()
    assert stacks.add(model, "a") and stacks.add(model, "b")
    ids = torch.randint(4, 500, (4, 7))
    rows = ["a", None, "b", "a"]
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=[r or "__base__" for r in rows]).logits
        with stacks.apply(model, rows):
            got = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[0], base[0], atol=1e-3)  # the adapters do something
    torch.testing.assert_close(got[1], base[1])


def test_s3_adapter_is_fetched_and_pickles_refused(tiny_model, tmp_path, monkeypatch):
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for k, v in {
            "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "x",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }.items():
            monkeypatch.setenv(k, v)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bucket")
        local = make_adapter(tiny_model, tmp_path / "a", seed=1)
        fs.put(f"{local}/", "bucket/runs/r1/adapter/", recursive=True)
        fs.pipe("bucket/pickled/adapter_config.json", (local / "adapter_config.json").read_bytes())
        fs.pipe("bucket/pickled/adapter_model.bin", b"never unpickled")
        path = resolve_adapter("s3://bucket/runs/r1", tmp_path / "root", tmp_path / "cache")
        assert sorted(p.name for p in path.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        assert check_compatible(path, base_linears(tiny_model), 64)["rank"] == 4
        with pytest.raises(AdapterError, match="only safetensors"):
            resolve_adapter("s3://bucket/pickled", tmp_path / "root", tmp_path / "cache")
    finally:
        server.stop()


def test_app_builder_for_serve_config_files(tiny_model, tmp_path):
    import yaml
    from ray.serve import Application

    from rayft.serving.app import ServeConfigError, app_builder

    job = tmp_path / "job.yaml"
    adapter = make_adapter(tiny_model, tmp_path / "a1", seed=1)
    job.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path),
                "model": {"base": tiny_model},
                "serve": {"adapters": {"a1": str(adapter)}},
            }
        )
    )
    assert isinstance(app_builder({"config": str(job)}), Application)
    with pytest.raises(ServeConfigError, match=r"serve.experiments.e: arm 'nope'"):
        app_builder({"config": str(job), "overrides": ["serve.experiments={e: {arms: {nope: 1}}}"]})


def test_config_dora_adapter_is_served_merged_when_the_engine_cannot(tiny_model, tmp_path):
    """`serve.dora: merge` (the CPU twin of vLLM): a configured DoRA adapter becomes a verified
    merged model directory served under its own name, and answers as the adapter does."""
    from rayft.config import JobConfig
    from rayft.serving.app import _settings
    from rayft.serving.hf_engine import TransformersEngine
    from rayft.serving.protocol import GenRequest

    dora = make_adapter(tiny_model, tmp_path / "dora", seed=5, dora=True)
    lora = make_adapter(tiny_model, tmp_path / "lora", seed=6)
    cfg = JobConfig(
        run_dir=str(tmp_path / "run"),
        model={"base": tiny_model},
        serve={
            "dora": "merge",
            "adapters": {"d1": str(dora), "a1": str(lora)},
            "experiments": {"e": {"arms": {"d1": 1, "a1": 1}}},
        },
    )
    s = _settings(cfg)
    assert set(s.registry.adapters) == {"a1"} and s.registry.merged["d1"]["app"] is None
    merged = Path(s.model_dirs["d1"])
    assert merged.is_relative_to((tmp_path / "run" / "serve" / "merged").resolve())
    assert list(merged.glob("*.safetensors")) and not list(merged.glob("*.bin"))
    assert _settings(cfg).model_dirs["d1"] == str(merged)  # the same weights: merged once
    engine = TransformersEngine(str(merged))
    ids = engine.tokenizer("hello world")["input_ids"]
    got = engine.generate([GenRequest(ids, 8, 0.0)])[0].text
    assert got == native_answer(tiny_model, dora, ids, 8)
    assert got != TransformersEngine(tiny_model).generate([GenRequest(ids, 8, 0.0)])[0].text
    # The engine that declared DoRA unsupported refuses it, should one reach it anyway.
    strict = TransformersEngine(tiny_model, dora="merge")
    (out,) = strict.generate([GenRequest(ids, 4, 0.0, adapter=fingerprint("d1", dora))])
    assert isinstance(out, AdapterRefused) and "serve.dora: merge" in str(out)


def test_merged_cache_is_keyed_on_base_and_dtype(tiny_model, tmp_path):
    """A merge is reused only for the same adapter, base and dtype: another base (or the same
    directory with new weights) or another dtype is merged again, never served stale."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from rayft.config import JobConfig
    from rayft.serving.merged import merge_adapter

    def weights(model_dir: str) -> dict[str, torch.Tensor]:
        (file,) = Path(model_dir).glob("*.safetensors")
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    def other_base(seed: int) -> None:  # tiny-llama with perturbed weights, in one directory
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(tmp_path / "base2")

    dora = make_adapter(tiny_model, tmp_path / "dora", seed=5, dora=True)
    job = JobConfig(run_dir=str(tmp_path / "run"), model={"base": tiny_model})
    first = merge_adapter(job, "d1", dora)
    assert merge_adapter(job, "d1", dora) == first  # the same inputs: reused
    bf16 = job.export.model_copy(update={"dtype": "bfloat16"})
    half = merge_adapter(job.model_copy(update={"export": bf16}), "d1", dora)
    assert half != first
    assert {t.dtype for t in weights(half).values()} == {torch.bfloat16}
    shutil.copytree(tiny_model, tmp_path / "base2")
    other_base(seed=1)
    job2 = job.model_copy(
        update={"model": job.model.model_copy(update={"base": str(tmp_path / "base2")})}
    )
    second = merge_adapter(job2, "d1", dora)
    assert second != first
    w1, w2 = weights(first), weights(second)
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # merged from the other base's weights
    other_base(seed=2)  # the same directory, new weights: merged again
    third = merge_adapter(job2, "d1", dora)
    assert third != second
    assert any(not torch.equal(w2[k], v) for k, v in weights(third).items())


def test_a_failing_group_fails_only_its_own_requests(tiny_model):
    """A request whose decoding fails (here: sampling settings the engine refuses) fails
    alone: the others of its batch still get their answers, streams included."""
    from rayft.serving.errors import EngineFailed
    from rayft.serving.hf_engine import TransformersEngine
    from rayft.serving.protocol import Delta, GenRequest, GenResult

    engine = TransformersEngine(tiny_model)
    ids = engine.tokenizer("hello world")["input_ids"]
    good = GenRequest(ids, 6, 0.0)
    bad = GenRequest(ids, 6, -1.0)  # a temperature the engine's decoder refuses
    want = engine.generate([good])[0].text
    out = engine.generate([good, bad])
    assert isinstance(out[0], GenResult) and out[0].text == want
    assert isinstance(out[1], EngineFailed) and "temperature" in str(out[1])
    assert out[1].status == 500 and "base" in out[1].message
    steps = list(engine.stream_batch([replace(good, stream=True), replace(bad, stream=True)]))
    good_entries, bad_entries = [s[0] for s in steps], [s[1] for s in steps]
    assert "".join(e.text for e in good_entries if isinstance(e, Delta)) == want
    assert any(isinstance(e, GenResult) and e.text == want for e in good_entries)
    assert any(isinstance(e, EngineFailed) for e in bad_entries)


def test_a_finished_row_is_answered_before_its_batch_ends(tiny_model):
    """A row done at its own max_tokens (or EOS) gets its result while a longer row of the
    same generate call still runs: a short stream does not wait for its longest neighbour."""
    from rayft.serving.hf_engine import TransformersEngine
    from rayft.serving.protocol import GenRequest, GenResult

    engine = TransformersEngine(tiny_model)
    ids = engine.tokenizer("hello world")["input_ids"]
    short, long = GenRequest(ids, 2, 0.0), GenRequest(ids, 12, 0.0)
    events: list[tuple] = []
    results = engine.generate([short, long], on_step=lambda rows, x: events.append((rows, x)))
    assert results[1].completion_tokens == 12  # no EOS: the long row runs all 12 steps
    answered = [k for k, (rows, _) in enumerate(events) if rows == 0]
    assert len(answered) == 1 and events[answered[0]][1] == results[0]
    assert isinstance(results[0], GenResult) and results[0].completion_tokens == 2
    later_steps = [rows for rows, _ in events[answered[0] + 1 :] if isinstance(rows, list)]
    assert len(later_steps) == 10  # the long row's steps 3..12 came after the short answer
    assert results == engine.generate([short, long])  # the same answers as without streaming


def test_engine_stops_at_every_end_token_the_model_declares(tiny_model, tmp_path):
    """Llama 3 ends a turn with <|eot_id|> and text with <|end_of_text|>; the generation config
    lists both (and `rayft merge` writes the trained end-of-turn ids there). The engine stopped
    only at the tokenizer's eos, so answers ran past the end of the turn."""
    from transformers import GenerationConfig

    from rayft.serving.hf_engine import TransformersEngine
    from rayft.serving.protocol import GenRequest

    engine = TransformersEngine(tiny_model)
    ids = engine.tokenizer("hello world")["input_ids"]
    plain = engine.generate([GenRequest(ids, 8, 0.0)])[0]
    assert plain.finish_reason == "length"
    with torch.inference_mode():  # the tokens the engine generated: greedy is deterministic
        out = engine.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    tokens = out[0, len(ids) :].tolist()
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    turn_end = tokens[2]
    GenerationConfig(eos_token_id=[engine.tokenizer.eos_token_id, turn_end]).save_pretrained(model)
    ended = TransformersEngine(str(model)).generate([GenRequest(ids, 8, 0.0)])[0]
    assert ended.finish_reason == "stop" and ended.completion_tokens < 8
    assert plain.text.startswith(ended.text) and len(ended.text) < len(plain.text)


def test_an_adapter_is_served_only_with_the_template_it_was_trained_with(tiny_model, tmp_path):
    """run.json's train facts name the chat template and end of turn; a base that renders
    prompts otherwise is refused with the reason (not found out as rambling answers)."""
    from transformers import AutoTokenizer

    from rayft.adapters import AdapterError
    from rayft.serving.ft_loop import check_template
    from rayft.training.facts import tokenizer_facts

    tok = AutoTokenizer.from_pretrained(tiny_model)
    facts = {"tokenizer": tokenizer_facts(Path(tiny_model), tmp_path)}

    def record(tokenizer_facts: dict) -> None:
        run = {"stages": {"train": {"facts": {"tokenizer": tokenizer_facts}}}}
        (tmp_path / "run.json").write_text(json.dumps(run))

    check_template(tmp_path, tok)  # nothing recorded: an older run passes ...
    with pytest.raises(AdapterError, match="no train facts"):
        check_template(tmp_path, tok, required=True)  # ... a fine-tuning job's may not
    record(facts["tokenizer"])
    check_template(tmp_path, tok, required=True)
    record({**facts["tokenizer"], "chat_template_sha256": "0" * 64})
    with pytest.raises(AdapterError, match="chat template"):
        check_template(tmp_path, tok)
    record({**facts["tokenizer"], "end_of_turn_ids": [*facts["tokenizer"]["end_of_turn_ids"], 7]})
    with pytest.raises(AdapterError, match="does not stop at"):
        check_template(tmp_path, tok)
