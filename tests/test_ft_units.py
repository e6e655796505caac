"""The fine-tuning service's parts without Ray: the store, uploads and row checks, the request
and object shapes (parsed by the `openai` package), the job file a request becomes, the service's
steps up to `queued` (create, validate, cancel, delete), what a running job writes turned into
events, checkpoints and the result CSV, the runner's helpers, and tenants' models in the
registry."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import yaml
from openai.types import FileObject
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

from rayft.adapters import AdapterRef
from rayft.config import JobConfig
from rayft.serving import ft_files, ft_jobs, ft_progress, ft_runner
from rayft.serving.errors import BadRequest, NotFound
from rayft.serving.ft_api import (
    JobCreate,
    checkpoint_object,
    event_object,
    file_object,
    job_object,
    page,
)
from rayft.serving.ft_store import Store, default_url
from rayft.serving.openai_api import parse
from rayft.serving.registry import Registry

CHAT = {
    "messages": [
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": "It ships tomorrow."},
    ]
}
NO_ANSWER = {"messages": [{"role": "user", "content": "Where is my order?"}]}
PREFERENCE = {
    "input": {"messages": [{"role": "user", "content": "Say hi"}]},
    "preferred_output": [{"role": "assistant", "content": "Hi!"}],
    "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
}


def jsonl(*rows: dict) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


# --------------------------------------------------------------------------- ft_store


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(default_url(tmp_path))


def add_file(store: Store, tenant: str, purpose: str = "fine-tune", **kw) -> dict:
    values = dict(tenant=tenant, filename="t.jsonl", purpose=purpose, bytes=1, rows=1, path="/x")
    return store.add("files", **{**values, **kw})


def add_job(store: Store, tenant: str, status: str) -> dict:
    return store.add(
        "jobs", tenant=tenant, model="tiny-llama", training_file="file-x", seed=1,
        method={"type": "supervised", "supervised": {"hyperparameters": {}}}, status=status,
        result_files=[], run_dir="/r", metrics_read=0,
    )  # fmt: skip


def test_store_get_is_scoped_to_the_tenant(store):
    """Another tenant's id is not found; tenant None (the admin) sees every row."""
    f = add_file(store, "acme")
    assert f["id"].startswith("file-") and f["tenant"] == "acme" and f["seq"] >= 1
    assert store.get("files", f["id"], "acme")["id"] == f["id"]
    assert store.get("files", f["id"], "globex") is None
    assert store.get("files", f["id"])["tenant"] == "acme"
    assert store.get("files", "file-nope") is None
    job = add_job(store, "acme", "queued")
    assert store.get("jobs", job["id"], "globex") is None
    assert store.get("jobs", job["id"], "acme")["method"]["type"] == "supervised"  # JSON back
    # Events belong to a job (no tenant column): a tenant never narrows them.
    ev = store.add("events", job_id=job["id"], level="info", message="m", type="message")
    assert store.get("events", ev["id"], "globex")["message"] == "m"


def test_store_update_and_delete(store):
    f = add_file(store, "acme")
    store.update("files", f["id"], rows=7)
    assert store.get("files", f["id"])["rows"] == 7
    store.delete("files", f["id"])
    assert store.get("files", f["id"]) is None


def test_store_page_newest_first_after_limit_has_more(store):
    """OpenAI's lists: newest first, `after` an id, `limit`, `has_more` (rows made in the same
    second keep their creation order)."""
    ids = [add_file(store, "acme")["id"] for _ in range(5)]
    add_file(store, "globex")
    rows, more = store.page("files", tenant="acme", limit=2)
    assert [r["id"] for r in rows] == [ids[4], ids[3]] and more
    rows, more = store.page("files", tenant="acme", after=ids[3], limit=2)
    assert [r["id"] for r in rows] == [ids[2], ids[1]] and more
    rows, more = store.page("files", tenant="acme", after=ids[1], limit=2)
    assert [r["id"] for r in rows] == [ids[0]] and not more
    rows, more = store.page("files", tenant="acme", limit=5)
    assert len(rows) == 5 and not more  # exactly `limit` rows left: no more
    rows, more = store.page("files", tenant=None, limit=100)
    assert len(rows) == 6 and not more


def test_store_page_oldest_first_and_filters(store):
    ids = [add_file(store, "acme")["id"] for _ in range(4)]
    result = add_file(store, "acme", purpose="fine-tune-results")
    rows, more = store.page("files", tenant="acme", newest_first=False, limit=2)
    assert [r["id"] for r in rows] == ids[:2] and more
    rows, _ = store.page("files", tenant="acme", newest_first=False, after=ids[1], limit=10)
    assert [r["id"] for r in rows] == [*ids[2:], result["id"]]
    rows, _ = store.page("files", tenant="acme", purpose="fine-tune-results")
    assert [r["id"] for r in rows] == [result["id"]]
    rows, _ = store.page("files", tenant="acme", purpose="fine-tune", limit=10)
    assert [r["id"] for r in rows] == ids[::-1]


def test_store_where_is_oldest_first_over_every_tenant(store):
    a = add_job(store, "acme", "queued")
    add_job(store, "acme", "running")
    b = add_job(store, "globex", "validating_files")
    c = add_job(store, "acme", "queued")
    add_job(store, "acme", "succeeded")
    got = store.where("jobs", "status", ["queued", "validating_files"])
    assert [r["id"] for r in got] == [a["id"], b["id"], c["id"]]
    assert store.where("jobs", "status", ["failed"]) == []


def test_store_registry_state_round_trip(store, tmp_path):
    assert store.load_registry() is None
    store.save_registry({"adapters": {}, "owners": {"a": "acme"}})
    store.save_registry({"adapters": {}, "owners": {"b": "globex"}})  # replaces, one row
    assert Store(default_url(tmp_path)).load_registry() == {
        "adapters": {},
        "owners": {"b": "globex"},
    }


# --------------------------------------------------------------------------- ft_files uploads


def upload(data: bytes, dest: Path, max_bytes: int = 10**6, max_rows: int = 100):
    return ft_files.store_upload(io.BytesIO(data), dest, max_bytes, max_rows)


def refused(data: bytes, dest: Path, **kw) -> BadRequest:
    with pytest.raises(BadRequest) as e:
        upload(data, dest, **kw)
    assert e.value.param == "file"
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()
    return e.value


def test_upload_keeps_a_character_split_across_chunks(tmp_path, monkeypatch):
    """Multi-byte UTF-8 characters cut by the read size are decoded whole, and every newline
    (in any chunk) ends a row."""
    monkeypatch.setattr(ft_files, "CHUNK", 7)
    data = jsonl(*({"text": f"né€😀 {i} ü"} for i in range(6)))
    assert any(0x80 <= data[i] < 0xC0 for i in range(7, len(data), 7))  # a cut in a character
    dest = tmp_path / "files" / "file-a.jsonl"
    assert upload(data, dest) == (len(data), 6)
    assert dest.read_bytes() == data


def test_upload_refuses_invalid_utf8_on_the_first_line(tmp_path):
    e = refused(b'{"a": "\xff"}\n{"a": 1}\n', tmp_path / "f.jsonl")
    assert e.code == "invalid_file" and "line 1 is not UTF-8" in e.message


def test_upload_names_the_line_of_invalid_utf8(tmp_path):
    data = jsonl({"a": 1}, {"a": 2}, {"a": 3}) + b'{"a": "\xff"}\n'
    e = refused(data, tmp_path / "f.jsonl")
    assert "line 4 is not UTF-8" in e.message


def test_upload_refuses_a_truncated_character_at_the_end(tmp_path):
    e = refused(b'{"a": 1}\n{"a": "\xc3', tmp_path / "f.jsonl")
    assert "line 2 is not UTF-8" in e.message


def test_upload_refuses_bad_json_and_non_objects_by_line(tmp_path):
    e = refused(b'{"a": 1}\n{oops}\n{"a": 3}\n', tmp_path / "f.jsonl")
    assert e.code == "invalid_file" and "line 2 is not valid JSON" in e.message
    e = refused(b'{"a": 1}\n\n[1, 2]\n', tmp_path / "f.jsonl")
    assert "line 3 is a JSONL row is a JSON object, got list" in e.message
    e = refused(b'{"a": 1}\n"text"', tmp_path / "f.jsonl")  # the last line, no newline
    assert "line 2" in e.message and "got str" in e.message


def test_upload_counts_rows_not_blank_lines(tmp_path):
    data = b'{"a": 1}\n\n   \n\r\n{"a": 2}\n\n'
    assert upload(data, tmp_path / "a.jsonl") == (len(data), 2)
    data = b'{"a": 1}\n{"a": 2}'  # no trailing newline: the last row still counts
    assert upload(data, tmp_path / "b.jsonl") == (len(data), 2)
    assert (tmp_path / "b.jsonl").read_bytes() == data


def test_upload_size_limit_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ft_files, "CHUNK", 4)
    data = jsonl({"a": 1}, {"a": 2})
    assert upload(data, tmp_path / "exact.jsonl", max_bytes=len(data))[0] == len(data)
    e = refused(data, tmp_path / "big.jsonl", max_bytes=len(data) - 1)
    assert e.code == "file_too_large"


def test_upload_row_limit(tmp_path, monkeypatch):
    data = jsonl({"a": 1}, {"a": 2}, {"a": 3})
    assert upload(data, tmp_path / "ok.jsonl", max_rows=3)[1] == 3
    assert refused(data, tmp_path / "x.jsonl", max_rows=2).code == "too_many_rows"
    assert refused(data[:-1], tmp_path / "y.jsonl", max_rows=2).code == "too_many_rows"
    monkeypatch.setattr(ft_files, "CHUNK", 5)  # counted while streaming too
    assert refused(data, tmp_path / "z.jsonl", max_rows=2).code == "too_many_rows"


def test_upload_refuses_an_empty_file(tmp_path):
    assert refused(b"", tmp_path / "a.jsonl").code == "invalid_file"
    assert "no rows" in refused(b"\n  \n", tmp_path / "b.jsonl").message


def test_upload_never_overwrites_its_destination(tmp_path):
    dest = tmp_path / "file-a.jsonl"
    first = jsonl({"a": 1})
    upload(first, dest)
    with pytest.raises((BadRequest, FileExistsError)):
        upload(jsonl({"b": 2}, {"b": 3}), dest)
    assert dest.read_bytes() == first


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "a\\b", "..", ".", "bad\nname", "tab\tname", "nul\x00", "", None]
)
def test_check_filename_refuses_paths_and_control_chars(name):
    with pytest.raises(BadRequest) as e:
        ft_files.check_filename(name)
    assert (e.value.param, e.value.code) == ("file", "invalid_file")


def test_check_filename_keeps_a_plain_name():
    assert ft_files.check_filename("train.jsonl") == "train.jsonl"
    assert ft_files.check_filename("données v2..jsonl") == "données v2..jsonl"


# --------------------------------------------------------------------------- ft_files rows


def rows_file(tmp_path: Path, *lines: dict | str) -> Path:
    path = tmp_path / "rows.jsonl"
    text = [x if isinstance(x, str) else json.dumps(x) for x in lines]
    path.write_text("\n".join(text) + "\n")
    return path


def test_check_rows_passes_good_files(tmp_path):
    path = rows_file(tmp_path, CHAT, "", {"text": "plain text"}, CHAT)
    assert ft_files.check_rows(path, "file-a", "training_file", "supervised") is None
    path = rows_file(tmp_path, PREFERENCE, PREFERENCE)
    assert ft_files.check_rows(path, "file-a", "training_file", "dpo") is None


def test_check_rows_names_file_line_and_field(tmp_path):
    """The line is the file's own (blank lines count), as the upload numbered it."""
    path = rows_file(tmp_path, CHAT, "", NO_ANSWER, NO_ANSWER)
    err = ft_files.check_rows(path, "file-abc", "training_file", "supervised")
    assert err["code"] == "invalid_training_file" and err["param"] == "training_file"
    assert err["message"].startswith("file-abc line 3, field messages")
    err = ft_files.check_rows(path, "file-v", "validation_file", "supervised")
    assert err["code"] == "invalid_validation_file" and err["param"] == "validation_file"
    assert err["message"].startswith("file-v line 3, field messages")


def test_check_rows_refuses_rows_of_the_other_method(tmp_path):
    err = ft_files.check_rows(
        rows_file(tmp_path, CHAT, PREFERENCE), "file-a", "training_file", "supervised"
    )
    assert err["message"].startswith("file-a line 2, field (row): a preference row")
    assert "supervised" in err["message"]
    err = ft_files.check_rows(
        rows_file(tmp_path, PREFERENCE, PREFERENCE, CHAT), "file-b", "training_file", "dpo"
    )
    assert err["message"].startswith("file-b line 3, field (row): a chat row")
    assert err["code"] == "invalid_training_file"


def test_check_rows_refuses_unknown_formats(tmp_path):
    err = ft_files.check_rows(
        rows_file(tmp_path, CHAT, {"question": "q"}), "file-a", "training_file", "supervised"
    )
    assert err["message"].startswith("file-a line 2, field (row)")


# --------------------------------------------------------------------------- ft_api requests


def create_body(**kw) -> dict:
    return {"model": "tiny-llama", "training_file": "file-a", **kw}


@pytest.mark.parametrize(
    "body, param",
    [
        (create_body(n_epochs=3), "n_epochs"),
        (create_body(hyperparameters={"n_epoch": 2}), "hyperparameters.n_epoch"),
        (create_body(method={"type": "dpo", "dpo": {"beta": 0.1}}), "method.dpo.beta"),
    ],
)
def test_job_create_refuses_unknown_fields(body, param):
    with pytest.raises(BadRequest) as e:
        parse(JobCreate, body)
    assert (e.value.code, e.value.param) == ("unknown_parameter", param)


@pytest.mark.parametrize(
    "body, param",
    [
        (create_body(suffix="my:model"), "suffix"),
        (create_body(suffix=""), "suffix"),
        (create_body(suffix="x" * 65), "suffix"),
        (create_body(integrations=[{"type": "wandb", "wandb": {"project": "p"}}]), "integrations"),
        (create_body(metadata={f"k{i}": "v" for i in range(17)}), "metadata"),
        (create_body(metadata={"k" * 65: "v"}), "metadata"),
        (create_body(seed=-1), "seed"),
        (create_body(hyperparameters={"n_epochs": 0}), "hyperparameters.n_epochs"),
        (create_body(method={"type": "distillation"}), "method.type"),
        (create_body(method={"type": "reinforcement"}), "method"),
        ({"model": "tiny-llama"}, "training_file"),
    ],
)
def test_job_create_refuses_bad_values(body, param):
    with pytest.raises(BadRequest) as e:
        parse(JobCreate, body)
    assert (e.value.code, e.value.param) == ("invalid_value", param)


def test_job_create_accepts_openai_shapes():
    req = parse(
        JobCreate,
        create_body(
            suffix="v1.2_x-y", integrations=[], metadata={f"k{i}": "v" for i in range(16)},
            seed=2**31 - 1, validation_file="file-b",
        ),
    )  # fmt: skip
    assert req.suffix == "v1.2_x-y" and req.kind() == "supervised"


def test_job_create_hyperparameters_where_given():
    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert parse(JobCreate, create_body()).hyper() == auto
    top = parse(JobCreate, create_body(hyperparameters={"n_epochs": 3}))
    assert top.hyper() == {**auto, "n_epochs": 3}
    method = {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 8}}}
    assert parse(JobCreate, create_body(method=method)).hyper() == {**auto, "batch_size": 8}
    both = parse(JobCreate, create_body(method=method, hyperparameters={"n_epochs": 3}))
    with pytest.raises(ValueError, match="twice"):
        both.hyper()
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2}}}
    req = parse(JobCreate, create_body(method=dpo))
    assert req.kind() == "dpo"
    assert req.hyper() == {**auto, "n_epochs": 2, "beta": 0.25}
    assert parse(JobCreate, create_body(method={"type": "dpo"})).hyper() == {**auto, "beta": "auto"}


@pytest.mark.parametrize(
    "hyper",
    [
        {"n_epochs": "auto"},
        {"batch_size": "auto"},
        {"learning_rate_multiplier": "auto"},
        {"beta": "auto"},
    ],
)
def test_job_create_takes_an_explicit_auto(hyper):
    """'auto' is OpenAI's own value for each hyperparameter: sent explicitly it means default."""
    method = {"type": "dpo", "dpo": {"hyperparameters": hyper}}
    req = parse(JobCreate, create_body(method=method))
    assert req.hyper()[next(iter(hyper))] == "auto"


def test_job_create_refuses_a_method_section_of_another_type():
    body = create_body(method={"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 5}}})
    with pytest.raises((BadRequest, ValueError)):
        parse(JobCreate, body).hyper()


@pytest.mark.parametrize("value", [True, "2"])
def test_job_create_integers_are_strict(value):
    with pytest.raises(BadRequest):
        parse(JobCreate, create_body(hyperparameters={"n_epochs": value}))


def test_job_create_param_of_a_bad_union_value():
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "many"}}}
    with pytest.raises(BadRequest) as e:
        parse(JobCreate, create_body(method=method))
    assert e.value.param == "method.supervised.hyperparameters.n_epochs"


# --------------------------------------------------------------------------- ft_runner.job_file


def server_job(tmp_path: Path, **kw) -> JobConfig:
    return JobConfig(**{"run_dir": str(tmp_path), "cluster": {"num_workers": 2}, **kw})


AUTO = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
TRAIN = {"training_file": {"id": "file-t", "path": "/state/files/file-t.jsonl"}}
VALID = {"validation_file": {"id": "file-v", "path": "/state/files/file-v.jsonl"}}


def test_job_file_maps_files_and_fixes_data_rules(tmp_path):
    job = server_job(
        tmp_path,
        data={"train_files": ["/server/own.jsonl"], "test_files": ["/server/test.jsonl"],
              "on_error": "skip", "split": {"validation": 0.2, "test": 0.1}},
        training={"eval_steps": 5},
        cluster={"num_workers": 2, "address": "ray://head:10001"},
    )  # fmt: skip
    cfg = ft_runner.job_file(
        job, "ftjob-1", tmp_path / "run", {**TRAIN, **VALID}, AUTO, "supervised", 7
    )
    d, t = cfg["data"], cfg["training"]
    assert cfg["name"] == "ftjob-1" and cfg["run_dir"] == str(tmp_path / "run")
    assert d["train_files"] == ["/state/files/file-t.jsonl"]
    assert d["validation_files"] == ["/state/files/file-v.jsonl"]
    assert d["test_files"] == []
    assert d["split"]["validation"] == 0.0 and d["split"]["test"] == 0.0
    assert d["on_error"] == "fail" and d["format"] == "auto"
    assert t["seed"] == 7 and t["objective"] == "sft" and t["eval_steps"] == 5
    # "auto" leaves the server's training defaults as they are.
    assert t["learning_rate"] == job.training.learning_rate
    assert t["per_device_batch_size"] == job.training.per_device_batch_size
    assert t["gradient_accumulation_steps"] == job.training.gradient_accumulation_steps
    assert t["dpo_beta"] == job.training.dpo_beta
    assert not {"serve", "eval", "export"} & set(cfg)
    assert cfg["cluster"]["address"] is None
    JobConfig.model_validate(cfg)  # a job file the CLI's stages take


def test_job_file_without_validation_file(tmp_path):
    job = server_job(tmp_path, training={"eval_steps": 5})
    cfg = ft_runner.job_file(job, "ftjob-1", tmp_path / "run", TRAIN, AUTO, "supervised", 1)
    assert cfg["data"]["validation_files"] == []
    assert cfg["training"]["eval_steps"] is None


def test_job_file_hyperparameters(tmp_path):
    job = server_job(tmp_path, training={"learning_rate": 1e-4, "per_device_batch_size": 4})
    hyper = {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 2.5}
    cfg = ft_runner.job_file(job, "ftjob-1", tmp_path / "run", TRAIN, hyper, "supervised", 1)
    t = cfg["training"]
    assert t["learning_rate"] == pytest.approx(2.5e-4)
    assert t["per_device_batch_size"] == 1 and t["gradient_accumulation_steps"] == 4
    assert t["max_steps"] == job.training.max_steps  # n_epochs is the runner's (steps_for)
    JobConfig.model_validate(cfg)


def test_job_file_dpo(tmp_path):
    job = server_job(tmp_path)
    cfg = ft_runner.job_file(job, "j", tmp_path / "r", TRAIN, {**AUTO, "beta": 0.3}, "dpo", 1)
    assert cfg["training"]["objective"] == "dpo" and cfg["training"]["dpo_beta"] == 0.3
    cfg = ft_runner.job_file(job, "j", tmp_path / "r", TRAIN, {**AUTO, "beta": "auto"}, "dpo", 1)
    assert cfg["training"]["dpo_beta"] == job.training.dpo_beta


def test_job_file_batch_size_must_divide_over_workers(tmp_path):
    with pytest.raises(BadRequest) as e:
        ft_runner.job_file(
            server_job(tmp_path), "j", tmp_path / "r", TRAIN, {**AUTO, "batch_size": 3},
            "supervised", 1,
        )  # fmt: skip
    assert (e.value.param, e.value.code) == ("hyperparameters.batch_size", "invalid_value")


# --------------------------------------------------------------------------- ft_jobs.Service


@pytest.fixture
def svc(tmp_path) -> ft_jobs.Service:
    job = server_job(
        tmp_path / "run",
        model={"base": "tiny-llama-dir"},
        serve={"fine_tuning": {"enabled": True, "state": str(tmp_path / "state")}},
    )
    return ft_jobs.Service(job, "tiny-llama")


def put(svc, tenant: str, *rows: dict, filename: str = "train.jsonl") -> dict:
    return svc.add_file(tenant, filename, "fine-tune", io.BytesIO(jsonl(*rows)))


def create(svc, tenant: str, **kw) -> dict:
    return svc.create(tenant, parse(JobCreate, {"model": "tiny-llama", **kw}))


def events(svc, job_id: str) -> list[dict]:
    return svc.store.page("events", limit=100, newest_first=False, job_id=job_id)[0]


def test_service_files(svc, tmp_path):
    f = put(svc, "acme", CHAT, CHAT)
    assert f["tenant"] == "acme" and f["filename"] == "train.jsonl" and f["rows"] == 2
    assert f["purpose"] == "fine-tune" and f["bytes"] == len(jsonl(CHAT, CHAT))
    assert Path(f["path"]) == tmp_path / "state" / "files" / f"{f['id']}.jsonl"
    assert Path(f["path"]).read_bytes() == jsonl(CHAT, CHAT)
    assert svc.file("acme", f["id"])["id"] == f["id"]
    assert svc.file(None, f["id"])["id"] == f["id"]
    with pytest.raises(NotFound) as e:
        svc.file("globex", f["id"])
    assert e.value.code == "file_not_found"
    with pytest.raises(NotFound):
        svc.delete_file("globex", f["id"])
    svc.delete_file("acme", f["id"])
    assert not Path(f["path"]).exists()
    with pytest.raises(NotFound):
        svc.file("acme", f["id"])


def test_service_refuses_uploads_and_stores_nothing(svc, tmp_path):
    with pytest.raises(BadRequest) as e:
        svc.add_file("acme", "train.jsonl", "assistants", io.BytesIO(jsonl(CHAT)))
    assert (e.value.param, e.value.code) == ("purpose", "invalid_purpose")
    with pytest.raises(BadRequest):
        svc.add_file("acme", "../train.jsonl", "fine-tune", io.BytesIO(jsonl(CHAT)))
    with pytest.raises(BadRequest):
        svc.add_file("acme", "train.jsonl", "fine-tune", io.BytesIO(b"{not json}\n"))
    assert svc.store.page("files", limit=10) == ([], False)
    assert list((tmp_path / "state").glob("files/*")) == []


def test_create_refuses_other_models(svc):
    f = put(svc, "acme", CHAT)
    with pytest.raises(BadRequest) as e:
        create(svc, "acme", training_file=f["id"], model="gpt-4o-mini")
    assert (e.value.param, e.value.code) == ("model", "model_not_available")
    with pytest.raises(BadRequest):  # continuing from a fine-tuned model is not offered
        create(svc, "acme", training_file=f["id"], model="ft:tiny-llama:acme::ftjob-1")
    for name in ("base", "tiny-llama-dir"):  # the alias and model.base name the base too
        assert create(svc, "acme", training_file=f["id"], model=name)["model"] == "tiny-llama"


def test_create_refuses_files_it_cannot_use(svc, tmp_path):
    mine, theirs = put(svc, "acme", CHAT), put(svc, "globex", CHAT)
    results = svc.store.add(
        "files", tenant="acme", filename="step_metrics.csv", purpose="fine-tune-results",
        bytes=1, rows=1, path="/x",
    )  # fmt: skip
    for file_id in ("file-nope", theirs["id"], results["id"]):
        with pytest.raises(BadRequest) as e:
            create(svc, "acme", training_file=file_id)
        assert (e.value.param, e.value.code) == ("training_file", "invalid_training_file")
    with pytest.raises(BadRequest) as e:
        create(svc, "acme", training_file=mine["id"], validation_file=theirs["id"])
    assert (e.value.param, e.value.code) == ("validation_file", "invalid_validation_file")
    assert svc.store.page("jobs", limit=10) == ([], False)
    assert not (tmp_path / "state" / "jobs").exists()


@pytest.mark.parametrize(
    "hyper, param",
    [
        ({"n_epochs": 11}, "hyperparameters.n_epochs"),
        ({"batch_size": 66}, "hyperparameters.batch_size"),
        ({"learning_rate_multiplier": 10.5}, "hyperparameters.learning_rate_multiplier"),
        ({"batch_size": 3}, "hyperparameters.batch_size"),  # 2 workers
    ],
)
def test_create_refuses_hyperparameters_over_limits(svc, tmp_path, hyper, param):
    f = put(svc, "acme", CHAT)
    with pytest.raises(BadRequest) as e:
        create(svc, "acme", training_file=f["id"], hyperparameters=hyper)
    assert (e.value.param, e.value.code) == (param, "invalid_value")
    assert svc.store.page("jobs", limit=10) == ([], False)
    assert not (tmp_path / "state" / "jobs").exists()


def test_create_refuses_hyperparameters_given_twice(svc):
    f = put(svc, "acme", CHAT)
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}
    with pytest.raises(BadRequest) as e:
        create(svc, "acme", training_file=f["id"], method=method, hyperparameters={"n_epochs": 2})
    assert e.value.param == "hyperparameters"


def test_create_writes_the_job_dir(svc, tmp_path):
    train, valid = put(svc, "acme", CHAT), put(svc, "acme", CHAT)
    row = create(
        svc, "acme", training_file=train["id"], validation_file=valid["id"], suffix="v1",
        seed=11, metadata={"team": "support"}, hyperparameters={"n_epochs": 3, "batch_size": 4},
    )  # fmt: skip
    assert row["id"].startswith("ftjob-") and row["status"] == "validating_files"
    assert row["tenant"] == "acme" and row["model"] == "tiny-llama" and row["seed"] == 11
    assert row["suffix"] == "v1" and row["metadata"] == {"team": "support"}
    assert row["method"] == {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": "auto"}
        },
    }
    job_dir = tmp_path / "state" / "jobs" / row["id"]
    assert Path(row["run_dir"]) == job_dir / "run"
    cfg = JobConfig.model_validate(yaml.safe_load((job_dir / "job.yaml").read_text()))
    assert cfg.name == row["id"] and cfg.run_dir == str(job_dir / "run")
    assert cfg.data.train_files == [train["path"]]
    assert cfg.data.validation_files == [valid["path"]]
    assert cfg.training.seed == 11 and cfg.training.gradient_accumulation_steps == 2
    request = json.loads((job_dir / "request.json").read_text())
    assert request == {
        "files": {
            train["path"]: ["training_file", train["id"]],
            valid["path"]: ["validation_file", valid["id"]],
        },
        "n_epochs": 3,
    }
    assert [e["message"] for e in events(svc, row["id"])] == [
        f"Validating training file: {train['id']}"
    ]
    assert svc.get(None, row["id"])["id"] == row["id"]
    with pytest.raises(NotFound):
        svc.get("globex", row["id"])


def test_create_without_seed_or_epochs(svc, tmp_path):
    f = put(svc, "acme", CHAT)
    row = create(svc, "acme", training_file=f["id"])
    assert 0 <= row["seed"] < 2**31 and row["validation_file"] is None and row["suffix"] is None
    request = json.loads((tmp_path / "state" / "jobs" / row["id"] / "request.json").read_text())
    assert request["n_epochs"] is None


def test_validate_queues_good_files_and_fails_bad_ones(svc):
    good = put(svc, "acme", CHAT, CHAT)
    bad = put(svc, "acme", CHAT, NO_ANSWER, NO_ANSWER)
    ok = create(svc, "acme", training_file=good["id"])
    failed = create(svc, "acme", training_file=good["id"], validation_file=bad["id"])
    svc.validate()
    assert svc.get("acme", ok["id"])["status"] == "queued"
    assert events(svc, ok["id"])[-1]["message"] == "Files validated, moving job to queued state"
    row = svc.get("acme", failed["id"])
    assert row["status"] == "failed" and row["finished_at"] is not None
    assert row["error"]["code"] == "invalid_validation_file"
    assert row["error"]["param"] == "validation_file"
    assert row["error"]["message"].startswith(f"{bad['id']} line 2, field messages")
    last = events(svc, failed["id"])[-1]
    assert last["level"] == "error" and last["message"].startswith("Job failed: " + bad["id"])


def test_validate_checks_the_method_and_deleted_files(svc):
    chat = put(svc, "acme", CHAT)
    dpo = create(svc, "acme", training_file=chat["id"], method={"type": "dpo"})
    gone = create(svc, "acme", training_file=put(svc, "acme", CHAT)["id"])
    svc.store.delete("files", gone["training_file"])
    svc.validate()
    row = svc.get("acme", dpo["id"])
    assert row["status"] == "failed"
    assert row["error"]["message"].startswith(f"{chat['id']} line 1, field (row): a chat row")
    row = svc.get("acme", gone["id"])
    assert row["status"] == "failed" and row["error"]["param"] == "training_file"
    assert "deleted" in row["error"]["message"]


def test_cancel_and_delete_file_in_use(svc):
    f = put(svc, "acme", CHAT)
    row = create(svc, "acme", training_file=f["id"])
    svc.validate()
    with pytest.raises(BadRequest) as e:
        svc.delete_file("acme", f["id"])
    assert e.value.code == "file_in_use" and row["id"] in e.value.message
    with pytest.raises(NotFound):
        svc.cancel("globex", row["id"])
    done = svc.cancel("acme", row["id"])
    assert done["status"] == "cancelled" and done["finished_at"] is not None
    assert events(svc, row["id"])[-1]["message"] == "Job cancelled by the user"
    with pytest.raises(BadRequest) as e:
        svc.cancel("acme", row["id"])
    assert e.value.code == "invalid_state"
    svc.delete_file("acme", f["id"])  # the job has ended: its file may go


def test_cancel_while_validating_stays_cancelled(svc):
    f = put(svc, "acme", CHAT)
    row = create(svc, "acme", training_file=f["id"])
    assert svc.cancel(None, row["id"])["status"] == "cancelled"  # the admin may cancel it
    svc.validate()
    assert svc.get("acme", row["id"])["status"] == "cancelled"


def test_cancel_during_validation_wins(svc, monkeypatch):
    """A job cancelled while its files are being checked is not queued after the check."""
    f = put(svc, "acme", CHAT)
    row = create(svc, "acme", training_file=f["id"])
    check = ft_jobs.check_rows

    def cancel_then_check(*args):
        svc.cancel("acme", row["id"])
        return check(*args)

    monkeypatch.setattr(ft_jobs, "check_rows", cancel_then_check)
    svc.validate()
    assert svc.get("acme", row["id"])["status"] == "cancelled"
    assert events(svc, row["id"])[-1]["message"] == "Job cancelled by the user"


# --------------------------------------------------------------------------- object shapes


def test_objects_parse_as_openai_types(svc):
    """What the routes answer is what the `openai` package reads (field for field OpenAI's)."""
    f = put(svc, "acme", CHAT)
    fo = FileObject.model_validate(file_object(svc.file("acme", f["id"])))
    assert (fo.id, fo.bytes, fo.filename, fo.purpose) == (
        f["id"],
        f["bytes"],
        "train.jsonl",
        "fine-tune",
    )
    method = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2}}}
    row = create(svc, "acme", training_file=f["id"], method=method, suffix="s", metadata={"a": "b"})
    job = FineTuningJob.model_validate(job_object(row))
    assert (
        job.id == row["id"] and job.status == "validating_files" and job.organization_id == "acme"
    )
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == "auto"
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert job.metadata == {"a": "b"} and job.result_files == [] and job.error is None
    assert "beta" not in job_object(row)["hyperparameters"]  # the old field has no beta
    svc.validate()  # a chat file for dpo: failed, with an error
    job = FineTuningJob.model_validate(job_object(svc.get("acme", row["id"])))
    assert job.status == "failed" and job.error.param == "training_file"
    assert job.error.code == "invalid_training_file" and job.finished_at is not None
    for e in events(svc, row["id"]):
        ev = FineTuningJobEvent.model_validate(event_object(e))
        assert ev.type == "message" and ev.data == {}
    svc.event(row["id"], "Step 1/10: training loss=1.0000", step=1, train_loss=1.0)
    ev = FineTuningJobEvent.model_validate(event_object(events(svc, row["id"])[-1]))
    assert ev.type == "metrics" and ev.data == {"step": 1, "train_loss": 1.0}
    ckpt = svc.store.add(
        "checkpoints", job_id=row["id"], step_number=4, path="/c",
        metrics=ft_progress.step_metrics([{"step": 4, "loss": 0.5, "eval_loss": 0.7}], 4),
        name=ft_progress.checkpoint_name(row, 4),
    )  # fmt: skip
    c = FineTuningJobCheckpoint.model_validate(checkpoint_object(ckpt))
    assert c.step_number == 4 and c.fine_tuning_job_id == row["id"]
    assert c.metrics.train_loss == 0.5 and c.metrics.full_valid_loss == 0.7
    assert c.fine_tuned_model_checkpoint.endswith(":ckpt-step-4")


def test_list_page_shape():
    rows = [{"id": "a"}, {"id": "b"}]
    assert page(rows, True, lambda r: r) == {
        "object": "list", "data": rows, "has_more": True, "first_id": "a", "last_id": "b"
    }  # fmt: skip
    assert page([], False, lambda r: r)["first_id"] is None


# --------------------------------------------------------------------------- ft_progress


ROW = {"id": "ftjob-x", "model": "tiny-llama", "tenant": "acme", "suffix": "v1"}


def test_model_and_checkpoint_names():
    assert ft_progress.model_name(ROW) == "ft:tiny-llama:acme:v1:ftjob-x"
    assert ft_progress.model_name({**ROW, "suffix": None}) == "ft:tiny-llama:acme::ftjob-x"
    assert ft_progress.checkpoint_name(ROW, 12) == "ft:tiny-llama:acme:v1:ftjob-x:ckpt-step-12"


METRICS = [
    {"step": 2, "eval_loss": 1.7},  # an eval row before its step's train row
    {"step": 1, "loss": 2.0, "learning_rate": 1e-4, "tokens": 100},
    {"step": 2, "loss": 1.5, "learning_rate": 9e-5, "tokens": 200},
    {"epoch": 1, "train_runtime": 3.0},  # no step: not a row of the CSV
]


def test_results_csv_one_row_per_step():
    out = list(csv.reader(io.StringIO(ft_progress.results_csv(METRICS))))
    assert out[0] == ["step", "train_loss", "valid_loss", "learning_rate", "tokens"]
    assert out[1:] == [["1", "2.0", "", "0.0001", "100"], ["2", "1.5", "1.7", "9e-05", "200"]]
    assert ft_progress.results_csv([]).splitlines() == [",".join(ft_progress.RESULT_COLUMNS)]


def test_step_metrics():
    assert ft_progress.step_metrics(METRICS, 2) == {
        "step": 2, "train_loss": 1.5, "valid_loss": 1.7, "full_valid_loss": 1.7
    }  # fmt: skip
    assert ft_progress.step_metrics(METRICS, 1) == {"step": 1, "train_loss": 2.0}
    assert ft_progress.step_metrics(METRICS, 9) == {"step": 9}


def test_error_of_prefers_the_runners_error(tmp_path):
    err = ft_progress.error_of(tmp_path, "x" * 5000)
    assert err["code"] == "training_failed" and err["param"] is None and len(err["message"]) < 1200
    (tmp_path / "error.json").write_text(json.dumps({"code": "c", "param": "p", "message": "m"}))
    assert ft_progress.error_of(tmp_path, "ray says") == {"code": "c", "param": "p", "message": "m"}


def test_progress_turns_a_run_dir_into_events_and_checkpoints(svc):
    """Without Ray: metrics rows become events once each, checkpoints on disk become the job's
    (named after its model, metrics filled in), and ones training removed are dropped."""
    f = put(svc, "acme", CHAT)
    row = create(svc, "acme", training_file=f["id"], suffix="v1")
    run = Path(row["run_dir"])
    (run / "checkpoints" / "t").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in METRICS[1:3]))
    for step in (1, 2):
        ckpt = run / "checkpoints" / "t" / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "adapter_model.safetensors").write_bytes(b"")
    svc.store.update("jobs", row["id"], status="running", started_at=1)
    ft_progress.progress(svc, svc.get(None, row["id"]))
    ft_progress.progress(svc, svc.get(None, row["id"]))  # nothing new: nothing added
    steps = [e for e in events(svc, row["id"]) if e["type"] == "metrics"]
    total = svc.job.training.max_steps
    assert [e["message"] for e in steps] == [
        f"Step 1/{total}: training loss=2.0000",
        f"Step 2/{total}: training loss=1.5000",
    ]
    assert steps[1]["data"] == {"step": 2, "total_steps": total, "train_loss": 1.5}
    job = svc.get(None, row["id"])
    assert job["metrics_read"] == 2 and job["estimated_finish"] is not None
    ckpts = svc.store.where("checkpoints", "job_id", [row["id"]])
    assert [(c["step_number"], c["name"]) for c in ckpts] == [
        (s, ft_progress.checkpoint_name(job, s)) for s in (1, 2)
    ]
    assert ckpts[1]["metrics"] == {"step": 2, "train_loss": 1.5}
    with open(run / "metrics.jsonl", "a") as out:
        out.write(json.dumps({"step": 2, "eval_loss": 1.25}) + "\n")
    (run / "checkpoints" / "t" / "checkpoint-1" / "adapter_model.safetensors").unlink()
    ft_progress.progress(svc, svc.get(None, row["id"]))
    assert events(svc, row["id"])[-1]["data"]["valid_loss"] == 1.25
    assert [c["step_number"] for c in svc.store.where("checkpoints", "job_id", [row["id"]])] == [2]


def test_succeed_records_the_result_file(svc):
    f = put(svc, "acme", CHAT)
    row = create(svc, "acme", training_file=f["id"])
    run = Path(row["run_dir"])
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in METRICS))
    (run / "train_summary.json").write_text(json.dumps({"tokens": 321}))
    name = ft_progress.model_name(row)
    assert not ft_jobs.succeed(svc, svc.get(None, row["id"]), name)  # only a running job
    svc.store.update("jobs", row["id"], status="running")
    assert ft_jobs.succeed(svc, svc.get(None, row["id"]), name)
    job = svc.get("acme", row["id"])
    assert job["status"] == "succeeded" and job["fine_tuned_model"] == name
    assert job["trained_tokens"] == 321 and len(job["result_files"]) == 1
    result = svc.file("acme", job["result_files"][0])
    assert result["purpose"] == "fine-tune-results" and result["filename"] == "step_metrics.csv"
    assert Path(result["path"]).read_bytes() == ft_progress.results_csv(METRICS).encode()
    FineTuningJob.model_validate(job_object(job))
    assert events(svc, row["id"])[-1]["message"] == "The job has successfully completed"


# --------------------------------------------------------------------------- ft_runner


def runner_cfg(tmp_path, per_device: int, accumulate: int) -> JobConfig:
    training = {"per_device_batch_size": per_device, "gradient_accumulation_steps": accumulate}
    return server_job(tmp_path, training=training)


def test_steps_for_counts_sequences_or_rows(tmp_path):
    cfg = runner_cfg(tmp_path, 2, 3)  # 2 x 3 x 2 workers = 12 examples a step
    packed = {"packing": {"sequences": {"train": 25}}, "rows_out": {"train": 1000}}
    assert ft_runner.steps_for(packed, cfg, 3, 2) == math.ceil(3 * 25 / 12) == 7
    rows = {"packing": None, "rows_out": {"train": 30}}
    assert ft_runner.steps_for(rows, cfg, 2, 2) == 5
    assert ft_runner.steps_for({"rows_out": {"train": 24}}, cfg, 1, 2) == 2
    assert ft_runner.steps_for({"rows_out": {"train": 1}}, cfg, 1, 2) == 1
    assert ft_runner.steps_for({"rows_out": {"train": 24}}, cfg, 1, 1) == 4  # 1 worker


def test_first_reject(tmp_path):
    files = {
        "/s/files/file-t.jsonl": ["training_file", "file-t"],
        "/s/files/file-v.jsonl": ["validation_file", "file-v"],
    }
    assert ft_runner.first_reject(tmp_path, files) is None
    (tmp_path / "rejects.jsonl").write_text("\n")
    assert ft_runner.first_reject(tmp_path, files) is None
    rejects = [
        {"file": "/s/files/file-v.jsonl", "line": 4, "field": "messages[1].role",
         "kind": "bad_role", "reason": "unknown role 'bot'"},
        {"file": "/s/files/file-v.jsonl", "line": 9, "field": "messages", "kind": "x", "reason": "r"},
        {"file": "/s/files/file-t.jsonl", "line": 2, "field": "messages", "kind": "x", "reason": "r"},
    ]  # fmt: skip
    (tmp_path / "rejects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejects))
    assert ft_runner.first_reject(tmp_path, files) == {
        "code": "invalid_validation_file",
        "param": "validation_file",
        "message": "file-v line 4, field messages[1].role: unknown role 'bot' (2 more bad rows)",
    }
    (tmp_path / "rejects.jsonl").write_text(json.dumps({**rejects[0], "file": "/o.jsonl"}))
    err = ft_runner.first_reject(tmp_path, files)
    assert err["param"] == "training_file" and err["message"].startswith("/o.jsonl line 4, ")
    assert "more bad rows" not in err["message"]


def test_runner_error_file(tmp_path):
    e = ft_runner.JobError({"code": "invalid_training_file", "message": "m"})
    assert e.error == {"param": None, "code": "invalid_training_file", "message": "m"}
    ft_runner._write_error(tmp_path, e.error)
    assert ft_progress.error_of(tmp_path, "")["code"] == "invalid_training_file"
    assert not (tmp_path / "error.json.tmp").exists()


# --------------------------------------------------------------------------- registry owners


FT = "ft:tiny:acme::ftjob-1"


def owned_registry(store: Store | None = None) -> Registry:
    reg = Registry(base_alias="tiny-llama", base_name="tiny", store=store)
    reg.add_adapter(AdapterRef(FT, "/state/jobs/ftjob-1/run/adapter", "k1"))
    reg.add_adapter(AdapterRef("shared", "/adapters/shared", "k2"))
    reg.owners[FT] = "acme"
    return reg


def test_registry_visible_by_tenant():
    reg = owned_registry()
    assert reg.visible("globex") == [("tiny", "rayft"), ("base", "rayft"), ("shared", "rayft")]
    assert reg.visible("acme") == [
        ("tiny", "rayft"), ("base", "rayft"), (FT, "acme"), ("shared", "rayft")
    ]  # fmt: skip
    assert (FT, "acme") in reg.visible(None)  # the admin sees every name
    assert [n for n, _ in Registry(base_alias="tiny-llama").visible(None)] == ["base"]


def test_registry_route_by_tenant():
    reg = owned_registry()
    assert reg.route(FT, None, "acme")[0].adapter.name == FT
    assert reg.route(f"base:{FT}", None, "acme")[0].arm == FT
    for model, tenant in ((FT, "globex"), (f"base:{FT}", "globex"), (FT, None)):
        with pytest.raises(NotFound) as e:
            reg.route(model, None, tenant)
        assert (e.value.code, e.value.param) == ("model_not_found", "model")
    assert reg.route("shared", None, "globex")[0].arm == "shared"
    reg.owners["shared"] = "default"  # an open API's tenant is `default`
    assert reg.route("shared", None, None)[0].arm == "shared"
    with pytest.raises(NotFound):
        reg.route("shared", None, "globex")


@pytest.mark.parametrize("prefix", ["tiny-llama:", "tiny:"])
def test_registry_route_refuses_other_tenants_under_every_prefix(prefix):
    with pytest.raises(NotFound):
        owned_registry().route(prefix + FT, None, "globex")


def test_registry_owners_persist_in_the_store(store):
    reg = owned_registry(store)
    assert Registry(base_alias="tiny-llama", store=store).restore() is False
    reg.add_experiment("exp", {"shared": 0.5, "base": 0.5}, None)
    reg.save()
    again = Registry(base_alias="tiny-llama", base_name="tiny", store=store)
    assert again.restore() is True
    assert again.owners == {FT: "acme"}
    assert again.adapters == reg.adapters and again.experiments == reg.experiments
    with pytest.raises(NotFound):
        again.route(FT, None, "globex")
    reg.remove_adapter(FT)  # unloading forgets its owner
    reg.save()
    assert store.load_registry()["owners"] == {}


def test_an_experiment_of_a_tenants_models_is_that_tenants():
    """The admin may make an experiment of a tenant's fine-tuned models: it is then that
    tenant's (listed and routed for it alone); arms of two tenants are refused."""
    reg = owned_registry()
    reg.add_experiment("ab", {FT: 0.5, "base": 0.5}, None)
    assert reg.owners["ab"] == "acme"
    assert reg.route("ab", "u1", "acme")[0].experiment == "ab"
    with pytest.raises(NotFound):
        reg.route("ab", "u1", "globex")
    assert "ab" not in dict(reg.visible("globex"))
    reg.add_experiment("open", {"shared": 1.0, "base": 1.0}, None)
    assert "open" not in reg.owners and reg.route("open", "u", "globex")[0].experiment == "open"
    reg.add_adapter(AdapterRef("ft:tiny:globex::ftjob-2", "/x", "k3"))
    reg.owners["ft:tiny:globex::ftjob-2"] = "globex"
    with pytest.raises(BadRequest, match="different tenants"):
        reg.add_experiment("mixed", {FT: 1.0, "ft:tiny:globex::ftjob-2": 1.0}, None)
    reg.remove_experiment("ab")
    assert "ab" not in reg.owners


def test_server_settings_refused_for_fine_tuning():
    """Refused when the server starts, not after a job trained: a tenant named like the admin
    key, a colon in a tenant (it is part of `ft:` names), a method whose result the engine does
    not hot-load, state on object storage."""
    from pydantic import ValidationError

    from rayft.serving.app import ServeConfigError, _check_fine_tuning, tenant_keys

    for keys in ({"admin": "k1"}, {"a:b": "k1"}):
        with pytest.raises(ServeConfigError):
            tenant_keys(keys)
    assert tenant_keys({"acme": "k1"}) == {"acme": "k1"}
    native = frozenset({"lora", "dora"})
    for method, kinds in (("full", native), ("dora", frozenset({"lora"}))):
        with pytest.raises(ServeConfigError, match="training.method"):
            _check_fine_tuning(JobConfig(training={"method": method}), kinds)
    _check_fine_tuning(JobConfig(training={"method": "qlora"}), frozenset({"lora"}))
    with pytest.raises(ValidationError, match="directory"):
        JobConfig(serve={"fine_tuning": {"state": "s3://bucket/ft"}})


def test_queue_starts_oldest_first_within_both_limits(tmp_path):
    """max_running_jobs bounds the cluster, max_running_per_tenant each tenant; a tenant at its
    limit does not hold up the others. (The Ray job itself is tests/test_ft_service.py's: here
    `submit` only records the order.)"""

    class Recorded(ft_jobs.Service):
        started: list[str] = []

        def submit(self, row: dict) -> str:
            self.started.append(row["id"])
            return f"ray-{row['id']}"

    job = server_job(
        tmp_path / "run",
        model={"base": "tiny-llama-dir"},
        serve={"fine_tuning": {"enabled": True, "state": str(tmp_path / "state"),
                               "max_running_jobs": 2, "max_running_per_tenant": 1}},
    )  # fmt: skip
    svc = Recorded(job, "tiny-llama")
    jobs = {}
    for name, tenant in (("a1", "acme"), ("a2", "acme"), ("g1", "globex"), ("g2", "globex")):
        jobs[name] = create(svc, tenant, training_file=put(svc, tenant, CHAT)["id"])["id"]
    svc.validate()
    svc.start_queued()
    assert svc.started == [jobs["a1"], jobs["g1"]]
    status = {n: svc.get(None, i)["status"] for n, i in jobs.items()}
    assert status == {"a1": "running", "a2": "queued", "g1": "running", "g2": "queued"}
    assert svc.get(None, jobs["a1"])["ray_job"] == ft_jobs.submission_id(jobs["a1"])
    svc.finish(svc.get(None, jobs["g1"]), "succeeded")  # globex's slot frees: its next starts
    svc.start_queued()
    assert svc.started[2:] == [jobs["g2"]]
    svc.start_queued()  # the cluster's 2 slots are taken (a1, g2): a2 waits
    assert svc.get(None, jobs["a2"])["status"] == "queued"


def test_a_job_ray_refuses_fails_with_the_reason_and_frees_its_slot(tmp_path):
    """A submission Ray refuses (a runtime_env it cannot build, say) fails that job, not the
    loop: the next queued job starts in the same round."""

    class Refusing(ft_jobs.Service):
        def submit(self, row: dict) -> str:
            if row["suffix"] == "bad":
                raise RuntimeError("Request failed with status code 400: bad runtime_env")
            return ft_jobs.submission_id(row["id"])

    job = server_job(
        tmp_path / "run",
        model={"base": "tiny-llama-dir"},
        serve={"fine_tuning": {"enabled": True, "state": str(tmp_path / "state")}},
    )
    svc = Refusing(job, "tiny-llama")
    f = put(svc, "acme", CHAT)["id"]
    bad = create(svc, "acme", training_file=f, suffix="bad")["id"]
    good = create(svc, "acme", training_file=f, suffix="good")["id"]
    svc.validate()
    svc.start_queued()
    failed = svc.get(None, bad)
    assert failed["status"] == "failed" and failed["error"]["code"] == "submission_failed"
    assert "bad runtime_env" in failed["error"]["message"] and failed["finished_at"]
    assert svc.get(None, good)["status"] == "running"
    assert not svc.finish(failed, "cancelled")  # an ended job stays as it ended


def test_a_new_server_adds_the_databases_loads_to_its_job_file(store):
    """An ingress replica of the same server takes its saved state whole; a new `rayft serve`
    keeps what its job file configures and adds what earlier servers loaded (through the
    admin API or fine-tuning) where the name is free and the adapter still fits."""
    old = Registry(base_alias="tiny-llama", base_name="tiny", store=store, server="s1")
    for name in (FT, "admin-a", "misfit", "shared"):
        old.add_adapter(AdapterRef(name, f"/a/{name}", "k"))
    old.owners[FT] = "acme"
    old.add_experiment("ab", {FT: 1.0, "base": 1.0}, None)
    old.add_experiment("gone", {"misfit": 1.0}, None)
    old.save()
    same = Registry(base_alias="tiny-llama", base_name="tiny", store=store, server="s1")
    assert same.restore() and set(same.adapters) == set(old.adapters)
    new = Registry(base_alias="tiny-llama", base_name="tiny", store=store, server="s2")
    new.add_adapter(AdapterRef("shared", "/configured/shared", "k2"))  # the job file's own
    assert new.restore(vet=lambda path: not path.endswith("misfit"))
    assert set(new.adapters) == {FT, "admin-a", "shared"}
    assert new.adapters["shared"].path == "/configured/shared"  # the job file wins
    assert set(new.experiments) == {"ab"}  # `gone` lost its arm
    assert new.owners == {FT: "acme", "ab": "acme"}
    with pytest.raises(NotFound):
        new.route(FT, None, "globex")


# --------------------------------------------------------------------------- reinforcement

RFT_ROW = {"messages": [{"role": "user", "content": "2 + 2?"}], "answer": "4"}
GRADER = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}
PYTHON = {"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1.0\n"}


def rft(grader: dict = GRADER, **hyper) -> dict:
    section = {"grader": grader, **({"hyperparameters": hyper} if hyper else {})}
    return {"type": "reinforcement", "reinforcement": section}


def test_reinforcement_jobs_train_grpo_with_the_requests_grader(svc, tmp_path):
    f = put(svc, "acme", RFT_ROW, RFT_ROW)
    row = create(
        svc, "acme", training_file=f["id"], validation_file=f["id"],
        method=rft(n_epochs=2, eval_interval=3),
    )  # fmt: skip
    assert row["method"]["reinforcement"]["grader"] == GRADER
    hyper = row["method"]["reinforcement"]["hyperparameters"]
    assert hyper == {
        "n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto", "eval_interval": 3
    }  # fmt: skip
    cfg = JobConfig.model_validate(
        yaml.safe_load((tmp_path / "state" / "jobs" / row["id"] / "job.yaml").read_text())
    )
    assert cfg.training.objective == "grpo" and cfg.training.grader == GRADER
    assert cfg.data.format == "reinforcement" and cfg.training.eval_steps == 3
    # OpenAI's client reads the job back, reinforcement method and grader included.
    job = FineTuningJob.model_validate(job_object(row))
    assert job.method.type == "reinforcement"
    assert job.method.reinforcement.grader.type == "string_check"
    assert job.hyperparameters.n_epochs == 2
    svc.validate()  # RFT rows: messages ending with the user's turn, plus the grader's fields
    assert svc.get("acme", row["id"])["status"] == "queued"


def test_reinforcement_refuses_python_graders_and_bad_ones(svc):
    f = put(svc, "acme", RFT_ROW)
    with pytest.raises(BadRequest) as e:
        create(svc, "acme", training_file=f["id"], method=rft(PYTHON))
    assert e.value.param == "method.reinforcement.grader"
    assert "only from a local job file" in str(e.value) or "python" in str(e.value)
    nested = {"type": "multi", "name": "m", "graders": {"p": PYTHON}, "calculate_output": "p"}
    with pytest.raises(BadRequest):  # nor hidden inside a multi grader
        create(svc, "acme", training_file=f["id"], method=rft(nested))
    with pytest.raises(BadRequest) as e:
        create(svc, "acme", training_file=f["id"], method=rft({**GRADER, "operation": "equals"}))
    assert "operation" in str(e.value)
    with pytest.raises(BadRequest):  # the type without its section
        create(svc, "acme", training_file=f["id"], method={"type": "reinforcement"})
    with pytest.raises(BadRequest):  # OpenAI's own RL compute knob: the server sets rollouts
        create(svc, "acme", training_file=f["id"], method=rft(compute_multiplier=2.0))


def test_reinforcement_refuses_chat_answers_in_its_file(svc):
    chat = put(svc, "acme", CHAT)
    row = create(svc, "acme", training_file=chat["id"], method=rft())
    svc.validate()
    row = svc.get("acme", row["id"])
    assert row["status"] == "failed" and row["error"]["param"] == "training_file"
    assert "line 1" in row["error"]["message"]


def test_reinforcement_job_file_batches_and_steps(tmp_path):
    job = server_job(tmp_path, training={"grpo": {"num_generations": 4}})
    hyper = {**AUTO, "batch_size": 4, "eval_interval": "auto"}
    cfg = ft_runner.job_file(
        job, "j", tmp_path / "r", TRAIN, hyper, "reinforcement", 1, grader=GRADER
    )
    t = cfg["training"]
    # 4 prompts a step over 2 workers: each worker's micro-batch is one prompt's 4 completions
    assert t["per_device_batch_size"] == 4 and t["gradient_accumulation_steps"] == 2
    parsed = JobConfig.model_validate(cfg)
    assert ft_runner.steps_for({"rows_out": {"train": 10}}, parsed, 2, 2) == 5  # 2 x 10 / 4
    hyper = {**AUTO, "eval_interval": 3}
    cfg = ft_runner.job_file(
        job, "j", tmp_path / "r", {**TRAIN, **VALID}, hyper, "reinforcement", 1, grader=GRADER
    )
    assert cfg["training"]["eval_steps"] == 3
    with pytest.raises(BadRequest) as e:  # without a validation file there is nothing to run
        ft_runner.job_file(
            job, "j", tmp_path / "r", TRAIN, hyper, "reinforcement", 1, grader=GRADER
        )
    assert e.value.param == "hyperparameters.eval_interval"
