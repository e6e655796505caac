"""`rayft serve` end to end on a real local Ray Serve with tiny-llama and PEFT adapters.

One application for the module (Serve start-up is the expensive part); each test talks HTTP
to 127.0.0.1 through the official `openai` client or plain `requests`.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections import Counter

import pytest
import requests
from test_serve_units import make_adapter, make_merged, native_answer

from rayft.config import JobConfig

pytestmark = pytest.mark.slow

KEY, ADMIN = "sk-test-inference", "sk-test-admin"
HI = [{"role": "user", "content": "hi there"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_local, tiny_model, tmp_path_factory):
    from rayft.serving import start, stop

    run = tmp_path_factory.mktemp("serve_run")
    a1 = make_adapter(tiny_model, run / "a1", seed=1)
    a2 = make_adapter(tiny_model, run / "a2", seed=2)
    make_adapter(tiny_model, run / "train3" / "adapter", seed=3)  # a run dir, for hot loading
    make_adapter(tiny_model, run / "dora4", seed=4, dora=True)  # served merged (serve.dora)
    merged = make_merged(tiny_model, a1, run / "merged1")
    cfg = JobConfig(
        run_dir=str(run),
        model={"base": tiny_model},
        serve={
            "port": free_port(),
            "api_key": KEY,
            "admin_key": ADMIN,
            "adapters": {"a1": str(a1), "a2": str(a2)},
            "models": {"m1": str(merged)},
            "experiments": {"exp": {"arms": {"base": 1, "a1": 1}, "shadow": "a2"}},
            "max_tokens_limit": 64,
            "max_n": 4,
            "num_replicas": 2,  # adapters load lazily on each replica: hot loads must reach both
            "cpus_per_replica": 0.5,  # 4 replicas in 2 of the session's 4 logical CPUs
            "dora": "merge",  # the engine declares DoRA unsupported, as vLLM does
        },
    )
    url = start(cfg)
    yield cfg, url
    stop()


def client(url: str, key: str = KEY):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key=key, max_retries=0)


def post(url: str, path: str, body, key: str | None = KEY) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(url.removesuffix("/v1") + path, json=body, headers=headers, timeout=60)


def chat_text(url: str, model: str, **kw) -> str:
    r = client(url).chat.completions.create(
        model=model, messages=HI, max_tokens=8, temperature=0, **kw
    )
    return r.choices[0].message.content


def test_openai_client_chat_stream_and_completions(server):
    cfg, url = server
    c = client(url)
    raw = c.chat.completions.with_raw_response.create(
        model="base", messages=HI, max_tokens=8, temperature=0
    )
    assert raw.headers["x-rayft-arm"] == "base"
    resp = raw.parse()
    assert resp.object == "chat.completion" and resp.usage.completion_tokens == 8
    assert resp.choices[0].finish_reason == "length" and resp.choices[0].message.content
    stream = c.chat.completions.create(
        model="base", messages=HI, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    pieces = [ch.choices[0].delta.content or "" for ch in chunks]
    assert len(pieces) > 2 and "".join(pieces) == resp.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"  # 8 tokens, the max_tokens asked
    comp = c.completions.create(model=cfg.model.base, prompt="hello", max_tokens=5, temperature=0)
    assert comp.object == "text_completion" and comp.usage.completion_tokens == 5
    ids = c.completions.create(model="base", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3
    models = {m.id for m in c.models.list()}
    assert {"base", "a1", "a2", "m1", "exp"} <= models


def test_adapters_change_answers_and_merged_matches_adapter(server):
    _, url = server
    base, a1, a2 = chat_text(url, "base"), chat_text(url, "a1"), chat_text(url, "base:a2")
    assert len({base, a1, a2}) == 3
    assert chat_text(url, "m1") == a1  # the merged model is adapter a1 folded into the base
    # Mixed-adapter batch: concurrent requests for different adapters get their own answers,
    # streams among them (they share batches with plain requests).
    results: dict[int, str] = {}

    def one(i: int, model: str) -> None:
        if i % 2 == 0:
            results[i] = chat_text(url, model)
            return
        stream = client(url).chat.completions.create(
            model=model, messages=HI, max_tokens=8, temperature=0, stream=True
        )
        results[i] = "".join(ch.choices[0].delta.content or "" for ch in stream)

    models = ["base", "a1", "a2"] * 3
    threads = [threading.Thread(target=one, args=(i, m)) for i, m in enumerate(models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = {"base": base, "a1": a1, "a2": a2}
    assert [results[i] for i in range(len(models))] == [want[m] for m in models]


def test_auth(server):
    _, url = server
    body = {"model": "base", "messages": HI, "max_tokens": 2}
    assert post(url, "/v1/chat/completions", body, key=None).status_code == 401
    r = post(url, "/v1/chat/completions", body, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert requests.get(url + "/models", timeout=30).status_code == 401
    assert post(url, "/admin/adapters", {"name": "x", "path": "a1"}, key=KEY).status_code == 401
    r = requests.get(
        url.removesuffix("/v1") + "/admin/adapters",
        timeout=30,
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert r.status_code == 200 and {"a1", "a2"} <= set(r.json()["adapters"])
    assert post(url, "/v1/chat/completions", body).status_code == 200


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/completions", {"prompt": "hello " * 3000, "max_tokens": 4}, 400, "prompt"),
        ("/v1/completions", {"prompt": [5, -1, 7], "max_tokens": 4}, 400, "prompt"),
        ("/v1/completions", {"prompt": [5, 512], "max_tokens": 4}, 400, "prompt"),
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 2.5}, 400, "max_tokens"),
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 100000}, 400, "max_tokens"),
        ("/v1/chat/completions", {"messages": HI, "max_tokens": -3}, 400, "max_tokens"),
        ("/v1/chat/completions", {"messages": HI, "n": 1000000}, 400, "n"),
        ("/v1/chat/completions", {"messages": [], "max_tokens": 2}, 400, "messages"),
        ("/v1/chat/completions", {"model": "base:nope", "messages": HI}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
    server, path, body, status, param
):
    _, url = server
    r = post(url, path, {"model": "base", **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"
    assert post(url, "/v1/completions", {"model": "base", "prompt": "ok", "max_tokens": 1}).ok


def test_ab_split_stickiness_shadow_feedback_and_report(server):
    from rayft.serving import ab_report

    cfg, url = server
    arms, ids = {}, {}
    for i in range(60):
        r = post(
            url,
            "/v1/completions",
            {"model": "exp", "prompt": "q", "max_tokens": 1, "temperature": 0, "user": f"u{i}"},
        )
        assert r.status_code == 200
        arms[f"u{i}"], ids[f"u{i}"] = r.headers["x-rayft-arm"], r.json()["id"]
    share = Counter(arms.values())
    assert set(share) == {"base", "a1"}  # the shadow arm never answers
    assert 18 <= share["a1"] <= 42, share  # 50% of 60, ±4 sd
    for u in ("u1", "u2", "u3"):  # sticky
        r = post(
            url, "/v1/completions", {"model": "exp", "prompt": "other", "max_tokens": 1, "user": u}
        )
        assert r.headers["x-rayft-arm"] == arms[u]
    for u, rid in ids.items():
        assert post(
            url, "/v1/feedback", {"response_id": rid, "rating": 5 if arms[u] == "a1" else 1}
        ).ok
    a1_id = next(ids[u] for u in ids if arms[u] == "a1")
    base_id = next(ids[u] for u in ids if arms[u] == "base")
    assert post(url, "/v1/feedback", {"response_id": a1_id, "preferred_over": base_id}).ok
    assert post(url, "/v1/feedback", {"response_id": "nope", "rating": 1}).status_code == 404
    log = cfg.run_path / "serve" / "requests.jsonl"
    deadline = time.time() + 30  # shadow copies are fire-and-forget: wait for them to land
    while time.time() < deadline:
        shadows = [json.loads(x) for x in log.read_text().splitlines() if '"shadow": true' in x]
        if len(shadows) >= 63:
            break
        time.sleep(0.5)
    assert len(shadows) >= 63 and {s["arm"] for s in shadows} == {"a2"}
    assert all(s["status"] == 200 for s in shadows)
    report = ab_report(cfg, experiment="exp")["exp"]
    assert report["arms"]["a1"]["requests"] == share["a1"] + sum(
        arms[u] == "a1" for u in ("u1", "u2", "u3")
    )
    assert (
        report["arms"]["a1"]["rating"]["mean"] == 5
        and report["arms"]["base"]["rating"]["mean"] == 1
    )
    assert report["pairwise"][0]["wins"] + report["pairwise"][0]["losses"] == 1
    assert (cfg.run_path / "serve" / "ab_report.json").exists()


def test_a_refused_request_never_reaches_the_shadow_arm(server):
    """A request refused with a 400 (here stream=true with n=2) was still copied to the shadow
    arm and logged there as a 200 answer. Only requests that are answered are shadowed."""
    cfg, url = server
    log = cfg.run_path / "serve" / "requests.jsonl"

    def shadow_rows() -> list[dict]:
        return [json.loads(x) for x in log.read_text().splitlines() if '"shadow": true' in x]

    before = len(shadow_rows())
    body = {"model": "exp", "messages": HI, "max_tokens": 2, "user": "refused"}
    r = post(url, "/v1/chat/completions", {**body, "stream": True, "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    ok = post(url, "/v1/chat/completions", {**body, "user": "answered"})
    assert ok.status_code == 200
    deadline = time.time() + 30
    while time.time() < deadline and not any(
        s["id"] == ok.json()["id"] + "-shadow" for s in shadow_rows()
    ):
        time.sleep(0.2)
    time.sleep(1)  # a copy of the refused request, sent first, would have landed by now
    assert len(shadow_rows()) == before + 1


def test_replicas_from_config(server):
    from ray import serve

    deployments = serve.status().applications["rayft"].deployments
    running = {n: d.replica_states.get("RUNNING", 0) for n, d in deployments.items()}
    assert running == {"Ingress": 1, "engine-base": 2, "engine-m1": 2}


def test_metrics_and_health(server):
    _, url = server
    root = url.removesuffix("/v1")
    r = requests.get(root + "/health", timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok", "engines": {"base": "ok", "m1": "ok"}}
    text = requests.get(root + "/metrics", timeout=30).text
    assert 'rayft_requests_total{arm="base",shadow="false",status="200"}' in text
    assert "rayft_request_latency_seconds_bucket" in text and "rayft_tokens_total" in text


def test_hot_load_and_unload_under_traffic(server):
    cfg, url = server
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            statuses.append(
                post(
                    url, "/v1/completions", {"model": "a1", "prompt": "x", "max_tokens": 2}
                ).status_code
            )

    t = threading.Thread(target=traffic)
    t.start()
    try:
        r = post(url, "/admin/adapters", {"name": "a3", "path": "train3"}, key=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["rank"] == 4
        a3 = chat_text(url, "a3")
        assert a3 not in (chat_text(url, "base"), chat_text(url, "a1"))
        r = requests.delete(
            url.removesuffix("/v1") + "/admin/adapters/a3",
            timeout=30,
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert r.status_code == 200
        r = post(url, "/v1/chat/completions", {"model": "a3", "messages": HI, "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        # an adapter that is an experiment's arm cannot be pulled from under it
        r = requests.delete(
            url.removesuffix("/v1") + "/admin/adapters/a1",
            timeout=30,
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert r.status_code == 400
    finally:
        stop.set()
        t.join()
    assert len(statuses) >= 3 and set(statuses) == {200}


def test_admin_refuses_unsafe_adapters(server, tmp_path):
    cfg, url = server
    run = cfg.run_path
    shutil.copytree(run / "a1", tmp_path / "outside")  # a valid adapter, outside the root
    (run / "escape").unlink(missing_ok=True)
    (run / "escape").symlink_to(tmp_path / "outside")
    pickled = run / "pickled"
    pickled.mkdir(exist_ok=True)
    (pickled / "adapter_config.json").write_text((run / "a1/adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded, ever")
    for spec in ["../" + run.name + "/a1", "/etc", str(tmp_path / "outside"), "escape", "pickled"]:
        r = post(url, "/admin/adapters", {"name": "bad", "path": spec}, key=ADMIN)
        assert r.status_code == 400, (spec, r.text)
        assert r.json()["error"]["param"] == "path"
    models = {m.id for m in client(url).models.list()}
    assert "bad" not in models


def admin(method: str, url: str, path: str, body=None) -> requests.Response:
    return requests.request(
        method,
        url.removesuffix("/v1") + path,
        json=body,
        timeout=300,  # a merged fallback deploys replicas before it answers
        headers={"Authorization": f"Bearer {ADMIN}"},
    )


def test_dora_adapter_the_engine_cannot_serve_gets_a_merged_deployment(server, tiny_model):
    from ray import serve
    from transformers import AutoTokenizer

    cfg, url = server
    root = url.removesuffix("/v1")
    r = admin("POST", url, "/admin/adapters", {"name": "d4", "path": "dora4"})
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["dora"] and info["served_as"] == "merged"
    merged = cfg.run_path.resolve() / "serve" / "merged"
    assert info["model_dir"].startswith(str(merged))
    assert "rayft-merged-d4" in serve.status().applications
    assert "d4" in {m.id for m in client(url).models.list()}
    tok = AutoTokenizer.from_pretrained(tiny_model)  # the ids the ingress sends for HI
    text = tok.apply_chat_template(HI, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    want = native_answer(tiny_model, cfg.run_path / "dora4", ids, 8)
    assert chat_text(url, "d4") == want != chat_text(url, "base")
    # ... and as an experiment's arm, created through the admin API
    r = admin("POST", url, "/admin/experiments", {"name": "dx", "arms": {"d4": 1}})
    assert r.status_code == 200, r.text
    raw = client(url).chat.completions.with_raw_response.create(
        model="dx", messages=HI, max_tokens=8, temperature=0
    )
    assert raw.headers["x-rayft-arm"] == "d4" and raw.parse().choices[0].message.content == want
    # A restarted ingress finds the merged deployment again (from its registry file).
    import ray

    def ingresses() -> list[str]:
        actors = ray.util.list_named_actors(all_namespaces=True)
        return [a["name"] for a in actors if a["namespace"] == "serve" and "#Ingress#" in a["name"]]

    (victim,) = ingresses()
    ray.kill(ray.get_actor(victim, namespace="serve"))
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if victim not in ingresses() and requests.get(root + "/health", timeout=10).ok:
                break
        except requests.RequestException:
            pass
        time.sleep(0.5)
    assert ingresses() and victim not in ingresses()
    assert chat_text(url, "d4") == want
    assert admin("DELETE", url, "/admin/adapters/d4").status_code == 400  # an arm of dx
    assert admin("DELETE", url, "/admin/experiments/dx").status_code == 200
    r = admin("DELETE", url, "/admin/adapters/d4")
    assert r.status_code == 200, r.text
    r = post(url, "/v1/chat/completions", {"model": "d4", "messages": HI, "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "d4" not in {m.id for m in client(url).models.list()}
    assert "rayft-merged-d4" not in serve.status().applications
    assert not list(merged.glob("d4-*"))  # its merged weights are gone with it


def test_admin_experiments_create_list_delete(server):
    _, url = server
    assert post(url, "/admin/experiments", {"name": "e2", "arms": {"a2": 1}}).status_code == 401
    for body, status, param in [
        ({"name": "e2", "arms": {"base": 1, "nope": 1}}, 404, "arms"),
        ({"name": "e2", "arms": {"base": 0}}, 400, "arms"),
        ({"name": "e2", "arms": {"exp": 1}}, 400, "arms"),  # an experiment is no arm
        ({"name": "a1", "arms": {"base": 1}}, 400, "name"),  # would shadow adapter a1
        ({"name": "../e2", "arms": {"base": 1}}, 400, "name"),
    ]:
        r = admin("POST", url, "/admin/experiments", body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == param
    r = admin("POST", url, "/admin/experiments", {"name": "e2", "arms": {"a2": 3}, "shadow": "a1"})
    assert r.status_code == 200, r.text
    listed = admin("GET", url, "/admin/experiments").json()["experiments"]
    assert listed["e2"] == {"arms": {"a2": 3}, "shadow": "a1"} and "exp" in listed
    assert "e2" in {m.id for m in client(url).models.list()}
    r = post(url, "/v1/completions", {"model": "e2", "prompt": "q", "max_tokens": 1})
    assert r.status_code == 200 and r.headers["x-rayft-arm"] == "a2"
    assert admin("DELETE", url, "/admin/experiments/e2").status_code == 200
    assert "e2" not in admin("GET", url, "/admin/experiments").json()["experiments"]
    r = post(url, "/v1/completions", {"model": "e2", "prompt": "q", "max_tokens": 1})
    assert r.status_code == 404
    assert admin("DELETE", url, "/admin/experiments/e2").status_code == 404


def test_failed_merged_deploy_is_removed_and_answered_with_an_error(server, tiny_model):
    """A merged deployment whose replicas cannot start (here: a corrupt cached merge) is
    deleted again, with its weights, and the admin call gets an OpenAI-style error."""
    from ray import serve

    from rayft.serving.merged import merge_dir

    cfg, url = server
    adapter = make_adapter(tiny_model, cfg.run_path / "dora5", seed=5, dora=True)
    work = merge_dir(cfg, "d5", adapter.resolve())
    (work / "merged").mkdir(parents=True)
    (work / "merged" / "config.json").write_text("{ not a model config")
    r = admin("POST", url, "/admin/adapters", {"name": "d5", "path": "dora5"})
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"], err["param"]) == (
        "server_error",
        "merged_deploy_failed",
        "path",
    )
    assert "'d5'" in err["message"] and "rayft-merged-d5" in err["message"]
    assert "rayft-merged-d5" not in serve.status().applications
    assert not work.exists()  # a retry merges again instead of reusing what does not start
    assert "d5" not in {m.id for m in client(url).models.list()}
    assert "d5" not in admin("GET", url, "/admin/adapters").json()["merged"]


def test_admin_load_and_unload_of_one_name_do_not_interleave(server, tiny_model):
    """A DELETE that arrives while a load of the same name is under way waits for the load,
    then unloads it: it neither answers 404 nor leaves the model loaded."""
    from ray import serve

    cfg, url = server
    make_adapter(tiny_model, cfg.run_path / "dora6", seed=6, dora=True)
    merged = cfg.run_path.resolve() / "serve" / "merged"
    loads: list[requests.Response] = []
    load = threading.Thread(
        target=lambda: loads.append(
            admin("POST", url, "/admin/adapters", {"name": "d6", "path": "dora6"})
        )
    )
    load.start()
    deadline = time.time() + 120
    while not list(merged.glob("d6-*")) and load.is_alive() and time.time() < deadline:
        time.sleep(0.05)  # the load is under way once its merge has begun
    unload = admin("DELETE", url, "/admin/adapters/d6")
    load.join()
    assert loads[0].status_code == 200, loads[0].text
    assert unload.status_code == 200, unload.text
    assert "d6" not in {m.id for m in client(url).models.list()}
    assert "rayft-merged-d6" not in serve.status().applications
    assert not list(merged.glob("d6-*"))
