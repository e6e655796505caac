"""Training pieces that need no Ray: packing independence, collator, DeepSpeed config, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from train_data import chat_rows, pack, tokenize_chat, write_preference, write_sft

from rayft.config import JobConfig
from rayft.training import TrainConfigError, train
from rayft.training.checks import problems
from rayft.training.data import collator
from rayft.training.dsconfig import DeepSpeedConfigError, deepspeed_config
from rayft.training.facts import resolve


def _cfg(run_dir, **training) -> JobConfig:
    return JobConfig.model_validate(
        {
            "name": "t",
            "run_dir": str(run_dir),
            "model": {"base": "tiny-llama"},
            "training": training,
        }
    )


def test_packed_examples_stay_independent(tiny_model):
    """transformers 5 turns restarting position ids (and no attention mask) into a block-diagonal
    mask: a packed example's logits and loss equal those of the example alone. Only without a KV
    cache (masking_utils skips the check when past_key_values exist), which is why the training
    model is loaded with use_cache=False."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.masking_utils import find_packed_sequence_indices

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model.config.use_cache = False
    a, b = (tokenize_chat(tok, m) for m in chat_rows(2, seed=3))
    (packed,) = pack([a, b], max_len=10_000)
    pos = torch.tensor([packed["position_ids"]])
    assert find_packed_sequence_indices(pos)[0].tolist() == [0] * len(a[0]) + [1] * len(b[0])

    batch = collator(tok.pad_token_id or 0)([packed])
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [packed["position_ids"]]  # from its seq_lengths
    with torch.no_grad():
        together = model(**batch).logits[0]
        alone_a = model(input_ids=torch.tensor([a[0]])).logits[0]
        alone_b = model(input_ids=torch.tensor([b[0]])).logits[0]
    torch.testing.assert_close(together[: len(a[0])], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[len(a[0]) :], alone_b, atol=1e-5, rtol=1e-5)

    # The loss of a pack is the token-weighted mean of its examples' losses.
    def loss_sum(ids, labels):
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        n = (torch.tensor(labels[1:]) != -100).sum()
        return out.loss * n, n

    with torch.no_grad():
        la, na = loss_sum(*a)
        lb, nb = loss_sum(*b)
        packed_loss = model(**batch).loss
    torch.testing.assert_close(packed_loss, (la + lb) / (na + nb), atol=1e-5, rtol=1e-5)

    # Without the restart, or with a KV cache, the second example sees the first.
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"]).logits[0][len(a[0]) :]
        cached = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True
        ).logits[0][len(a[0]) :]
    assert not torch.allclose(leaky, alone_b, atol=1e-3)
    assert not torch.allclose(cached, alone_b, atol=1e-3)


def test_collator_masks_the_first_token_of_every_example():
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "seq_lengths": [3, 2]},
        {"input_ids": [3, 4], "labels": [-100, 4], "seq_lengths": [2]},
    ]
    batch = collator(0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 4]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]


def test_deepspeed_config_from_keys_and_raw(tmp_path):
    assert deepspeed_config(0) is None
    z2 = deepspeed_config(2, offload_optimizer=True)
    assert z2["zero_optimization"]["stage"] == 2
    assert z2["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert z2["train_micro_batch_size_per_gpu"] == "auto"
    z3 = deepspeed_config(3, offload_params=True)["zero_optimization"]
    assert z3["stage3_gather_16bit_weights_on_model_save"] is True
    assert z3["offload_param"]["device"] == "cpu"

    raw = {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": "auto"}
    assert deepspeed_config(3, raw_config=raw) == raw
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(raw))
    assert deepspeed_config(0, raw_config=str(path)) == raw
    path.write_text("{not json")
    with pytest.raises(DeepSpeedConfigError, match=r"ds.json:1: .*not valid JSON"):
        deepspeed_config(0, raw_config=str(path))


@pytest.mark.parametrize(
    ("training", "cluster", "kind", "expected"),
    [
        ({"objective": "dpo"}, {}, "sft", "holds chat, instruction or text rows"),
        ({"objective": "sft"}, {}, "preference", "holds preference pairs"),
        ({"objective": "reward"}, {}, "sft", "trains on preference pairs"),
        ({"objective": "kto", "per_device_batch_size": 2}, {}, "preference", "unpaired good/bad"),
        ({"objective": "kto"}, {}, "unpaired", "per_device_batch_size >= 2"),
        ({"grader": {"type": "regex", "name": "r", "pattern": "x"}}, {}, "sft", "no rewards"),
        ({"early_stopping": {}}, {}, "sft", "needs training.eval_steps"),
        (
            {"early_stopping": {}, "eval_steps": 2, "save_steps": 4},
            {},
            "sft",
            "leave training.save_steps unset or equal",
        ),
        (
            {"early_stopping": {"metric": "eval_reward"}, "eval_steps": 2},
            {},
            "sft",
            "only grpo has one",
        ),
        ({"precision": "fp16"}, {}, "sft", "fp16 needs a GPU"),
        ({"deepspeed": {"zero_stage": 2, "offload_params": True}}, {}, "sft", "needs zero_stage 3"),
        ({"deepspeed": {"offload_optimizer": True}}, {}, "sft", "needs zero_stage >= 1"),
        (
            {
                "method": "qlora",
                "deepspeed": {"zero_stage": 3},
                "quantization": {"quant_storage": "uint8"},
            },
            {},
            "sft",
            "quant_storage: bfloat16",
        ),
        (
            {"method": "qlora", "deepspeed": {"zero_stage": 3, "offload_params": True}},
            {},
            "sft",
            "cannot be offloaded",
        ),
        ({"eval_steps": 3, "save_steps": 4}, {}, "sft", "multiple of training.eval_steps"),
    ],
)
def test_known_bad_combinations_are_explained(tmp_path, training, cluster, kind, expected):
    cfg = JobConfig.model_validate({"training": training, "cluster": cluster})
    found = problems(cfg, kind)
    assert len(found) == 1 and expected in found[0], found


def test_a_raw_deepspeed_config_decides_the_stage(tmp_path):
    """The stage DeepSpeed runs is the raw config's (file or mapping), never the unused
    zero_stage key: 4-bit storage, the checks and the summary follow it."""
    from rayft.training.driver import _worker_config
    from rayft.training.dsconfig import zero_stage

    raw = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(raw))
    assert zero_stage(deepspeed_config(0, raw_config=str(path))) == 3
    assert zero_stage(deepspeed_config(2)) == 2 and zero_stage(deepspeed_config(0)) == 0
    # no ZeRO section: no ZeRO
    assert zero_stage(deepspeed_config(2, raw_config={"train_batch_size": "auto"})) == 0
    with pytest.raises(DeepSpeedConfigError, match="stage is 'three'"):
        zero_stage(deepspeed_config(0, raw_config={"zero_optimization": {"stage": "three"}}))
    # a ZeRO-3 save gathers the weights, as with generated configs; the input stays as it was
    z3 = deepspeed_config(0, raw_config=str(path))["zero_optimization"]
    assert z3["stage3_gather_16bit_weights_on_model_save"] is True
    assert (
        "stage3_gather_16bit_weights_on_model_save"
        not in json.loads(path.read_text())["zero_optimization"]
    )

    def refused(**training) -> list[str]:
        return problems(JobConfig.model_validate({"training": training}), "sft")

    qlora = {"method": "qlora", "quantization": {"quant_storage": "uint8"}}
    assert "quant_storage: bfloat16" in " ".join(
        refused(**qlora, deepspeed={"raw_config": str(path)})
    )
    assert refused(**qlora, deepspeed={"raw_config": {"zero_optimization": {"stage": 2}}}) == []
    offload = {"stage": 3, "offload_param": {"device": "cpu"}}  # 4-bit weights cannot move
    (found,) = refused(method="qlora", deepspeed={"raw_config": {"zero_optimization": offload}})
    assert "cannot be offloaded" in found
    no_gather = {
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}
    }
    (found,) = refused(method="full", deepspeed={"raw_config": no_gather})
    assert "no loadable weights" in found
    (found,) = refused(deepspeed={"raw_config": str(tmp_path / "missing.json")})
    assert "missing.json" in found and "cannot read" in found

    cfg = JobConfig.model_validate(
        {"run_dir": str(tmp_path), "training": {"deepspeed": {"raw_config": str(path)}}}
    )
    ds = deepspeed_config(0, raw_config=str(path))
    facts = resolve(cfg, ds, str(tmp_path))
    assert _worker_config(cfg, facts, "sft", "sft", ds, False)["facts"]["deepspeed"] == {
        "zero_stage": 3,
        "offload_optimizer": False,
        "offload_params": False,
        "raw_config": True,
    }


def test_facts_resolve_the_4bit_layout_from_the_stage_deepspeed_runs():
    """What the workers load and run.json records: QLoRA under a raw ZeRO-3 config stores 4-bit
    weights in bf16 and quantizes a base loaded in bf16, whatever the unused zero_stage key says;
    outside ZeRO-3 packed uint8 from the compute dtype."""
    from rayft.training.facts import for_config

    def facts(**sections):
        cfg = JobConfig.model_validate({"model": {"base": "tiny-llama"}, **sections})
        return for_config(cfg, "/models/tiny-llama")

    raw_z3 = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    qlora = facts(
        training={"method": "qlora", "deepspeed": {"zero_stage": 0, "raw_config": raw_z3}}
    )
    assert qlora["deepspeed"]["zero_stage"] == 3 and qlora["deepspeed"]["offload_optimizer"]
    assert qlora["quantization"] == {
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "float32",
        "storage_dtype": "bfloat16",
        "loaded_dtype": "bfloat16",
    }
    assert qlora["base"] == {"id": "tiny-llama", "revision": None, "path": "/models/tiny-llama"}
    gpu = facts(
        training={"method": "qlora", "deepspeed": {"zero_stage": 2}}, cluster={"use_gpu": True}
    )
    assert gpu["compute_dtype"] == "bfloat16"
    assert (gpu["quantization"]["storage_dtype"], gpu["quantization"]["loaded_dtype"]) == (
        "uint8",
        "bfloat16",
    )
    dora = facts(training={"method": "dora", "precision": "fp32"}, cluster={"use_gpu": True})
    assert dora["use_dora"] and dora["quantization"] is None
    assert dora["compute_dtype"] == "float32"


def test_a_tracker_that_is_not_installed_is_refused_before_any_worker(monkeypatch):
    import sys

    cfg = JobConfig.model_validate({"training": {"tracking": {"backends": ["tensorboard"]}}})
    assert problems(cfg, "sft") == []  # a dev dependency: installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what find_spec says of a missing one
    (found,) = problems(cfg, "sft")
    assert "tensorboard, which is not installed" in found and "pip install tensorboard" in found


def test_good_combinations_pass():
    for training in (
        {"method": "qlora", "deepspeed": {"zero_stage": 3}},  # auto storage -> bfloat16
        {"method": "lora", "deepspeed": {"zero_stage": 3, "offload_params": True}},
        {"method": "dora", "deepspeed": {"zero_stage": 2, "offload_optimizer": True}},
        {"method": "full", "precision": "fp32"},
    ):
        assert problems(JobConfig.model_validate({"training": training}), "sft") == []


def test_train_refuses_before_any_worker_starts(tmp_path, tiny_model):
    import ray

    write_preference(tmp_path)
    ray_was_up = ray.is_initialized()  # another test of the session may have started it
    with pytest.raises(
        TrainConfigError,
        match="objective=sft trains on chat, instruction or text rows, but the prepared data holds preference",
    ):
        train(_cfg(tmp_path, objective="sft"))
    assert ray.is_initialized() == ray_was_up  # refused before the driver even touched Ray
    assert not (tmp_path / "metrics.jsonl").exists()


def test_fresh_run_does_not_silently_continue_old_checkpoints(tmp_path, tiny_model):
    import ray

    write_sft(tmp_path, tiny_model, n_train=4, n_val=2)
    snapshot = tmp_path / "checkpoints" / "t" / "checkpoint_manager_snapshot.json"
    snapshot.parent.mkdir(parents=True)
    snapshot.write_text("{}")
    ray_was_up = ray.is_initialized()
    with pytest.raises(TrainConfigError, match="--resume"):
        train(_cfg(tmp_path))
    assert ray.is_initialized() == ray_was_up
    assert snapshot.read_text() == "{}"  # the old run is left untouched


def test_missing_data_says_to_run_prepare(tmp_path):
    from rayft.training.data import TrainDataError

    with pytest.raises(TrainDataError, match="rayft prepare"):
        train(_cfg(tmp_path))


class _CountingShard:
    """A real Ray DataIterator that counts the passes started over it."""

    def __init__(self, it):
        self.it, self.passes = it, 0

    def iter_batches(self, **kwargs):
        self.passes += 1
        return self.it.iter_batches(**kwargs)


def _epochs(shard, n_rows: int, epochs: int, cache_bytes: int) -> list[list[tuple]]:
    from itertools import islice

    from rayft.training.data import endless_rows

    rows = list(islice(endless_rows(shard, "sft", 7, cache_bytes=cache_bytes), n_rows * epochs))
    keys = [(r["input_ids"][0], len(r["input_ids"])) for r in rows]
    return [keys[i * n_rows : (i + 1) * n_rows] for i in range(epochs)]


def test_shard_cache_replays_epochs_without_rereading(ray_local):
    import ray.data

    n = 40
    lengths = [3 + i % 5 for i in range(n)]
    items = [
        {"input_ids": [i] * k, "labels": [i] * k, "seq_lengths": [k]} for i, k in enumerate(lengths)
    ]
    ds = ray.data.from_items(items)

    cached = _CountingShard(ds.iterator())
    a = _epochs(cached, n, 4, cache_bytes=2**20)
    assert cached.passes == 1  # epochs 1..3 come from the cache
    assert all(sorted(e) == sorted(a[0]) for e in a)  # every epoch is the whole shard once
    assert len({tuple(e) for e in a}) == 4  # each epoch in its own order

    again = _CountingShard(ds.iterator())
    assert _epochs(again, n, 4, cache_bytes=2**20) == a  # deterministic: resume replays it

    tiny_cache = _CountingShard(ds.iterator())
    b = _epochs(tiny_cache, n, 3, cache_bytes=100)  # the shard outgrows it: stream each epoch
    assert tiny_cache.passes == 3
    assert b[0] == a[0] and all(sorted(e) == sorted(a[0]) for e in b)


def test_mfu_from_parameters_tokens_and_device_peaks(tiny_model):
    from transformers import AutoModelForCausalLM

    from rayft.training.flops import flops_per_token, mfu, parameter_count, peak_tflops

    n = parameter_count(tiny_model)
    assert n == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters()
    )
    assert flops_per_token(n, "full") == 6 * n and flops_per_token(n, "lora") == 4 * n
    assert peak_tflops("NVIDIA L40") == 181.0 and peak_tflops("NVIDIA L4") == 121.0
    assert (
        peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    )
    # 2 x H200 at 100k tokens/s of a 1B model, LoRA: 4e9 * 1e5 / (2 * 989e12)
    assert mfu(1e5, 4e9, ["NVIDIA H200", "NVIDIA H200"]) == pytest.approx(4e14 / 1.978e15)
    assert mfu(1e5, 4e9, ["cpu", "cpu"]) is None and mfu(1e5, 4e9, []) is None


def test_metrics_file_replaces_the_steps_a_restored_run_replays(tmp_path):
    """An evaluation flushes rows 4..6 before checkpoint 6, the run dies, and the restore from
    checkpoint 3 logs 4..6 again: metrics.jsonl keeps each step once, the replayed values."""
    from rayft.training.report import MetricsFile

    def loss(step, value):
        return {"step": step, "loss": value}

    first = MetricsFile(str(tmp_path), max_steps=8)
    first.after_report(None, [{"rows": [loss(s, 1.0) for s in (1, 2, 3)]}], None)
    first.after_report(
        None, [{"rows": [*[loss(s, 1.0) for s in (4, 5, 6)], {"step": 6, "eval_loss": 9.0}]}], None
    )
    # `rayft train --resume` is a new process: a new MetricsFile over the same file.
    resumed = MetricsFile(str(tmp_path), max_steps=8)
    resumed.after_report(None, [{"rows": [loss(s, 2.0) for s in (4, 5, 6, 7)]}], None)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("loss")) for r in rows] == [
        (1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0), (6, 2.0), (7, 2.0)
    ]  # fmt: skip
    # HF's end-of-training row (no loss) is no step's: it goes beside metrics.jsonl, whose
    # every row keeps a loss or an eval loss (the contract).
    resumed.after_report(None, [{"rows": [{"step": 7, "train_runtime": 1.0}]}], None)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and all("loss" in r or "eval_loss" in r for r in rows)
    assert json.loads((tmp_path / "train_end.json").read_text()) == {
        "step": 7,
        "train_runtime": 1.0,
    }


def test_validation_rows_are_read_once_when_they_fit():
    """Each evaluation read the validation shard again: a Ray Data execution per evaluation.
    Rows that fit in the shard cache are kept after the first full pass and replayed."""
    from rayft.training.worker import _KeptRows

    class Source:
        passes = 0

        def __iter__(self):
            Source.passes += 1
            yield from ({"input_ids": [i] * 4, "labels": [i] * 4} for i in range(10))

    kept = _KeptRows(Source(), limit=2**20)
    first, second = list(kept), list(kept)
    assert first == second and len(first) == 10 and Source.passes == 1
    Source.passes = 0
    small = _KeptRows(Source(), limit=100)  # 10 rows x 64 bytes do not fit: read every time
    assert list(small) == first and list(small) == first and Source.passes == 2
    Source.passes = 0
    partial = _KeptRows(Source(), limit=2**20)
    next(iter(partial))  # a pass not read to its end is not kept
    assert list(partial) == first and Source.passes == 2


def test_an_empty_validation_split_is_no_validation(ray_local, tmp_path):
    """prepare writes `data.split.validation: 0` as a file of no rows; the trainers must not get
    an empty validation set (DPO's fails on one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayft.training.data import read_splits

    table = pa.table({"prompt": ['[{"role": "user", "content": "q"}]'] * 2,
                      "chosen": ["a", "b"], "rejected": ["c", "d"]})  # fmt: skip
    for split, rows in (("train", table), ("validation", table.slice(0, 0))):
        (tmp_path / f"{split}.parquet").mkdir()
        pq.write_table(rows, tmp_path / f"{split}.parquet" / "part-0.parquet")
    assert set(read_splits(tmp_path, "preference")) == {"train"}
    pq.write_table(table, tmp_path / "validation.parquet" / "part-1.parquet")
    assert set(read_splits(tmp_path, "preference")) == {"train", "validation"}
