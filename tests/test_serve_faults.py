"""Serving under stress: a replica killed under constant load, backpressure, graceful shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml
from test_serve_api import free_port

from rayft.config import JobConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(ray_local, tiny_model, tmp_path_factory):
    from rayft.serving import start, stop

    cfg = JobConfig(
        run_dir=str(tmp_path_factory.mktemp("serve_faults")),
        model={"base": tiny_model},
        serve={
            "port": free_port(),
            "max_ongoing_requests": 2,
            "max_queued_requests": 2,
            "max_tokens_limit": 512,
        },
    )
    url = start(cfg)
    yield cfg, url
    stop()


def complete(url: str, max_tokens: int) -> int:
    body = {"model": "base", "prompt": "hello", "max_tokens": max_tokens, "temperature": 0}
    try:
        return requests.post(url + "/completions", json=body, timeout=120).status_code
    except requests.RequestException:
        return -1


def test_rayft_serve_stops_on_sigterm(tiny_model, tmp_path):
    """`rayft serve` in its own process with its own embedded Ray: it serves, and SIGTERM
    removes the deployments, stops that Ray and exits 0. Runs before the module's shared
    server exists, so the two Serve instances never compete for the two cores."""
    port = free_port()
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "run"),
                "model": {"base": tiny_model},
                "serve": {"port": port},
                "cluster": {"address": None},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rayft.cli", "serve", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:  # the ready line comes after serve.run returned: every replica is up
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("rayft serve: http"):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while not ready.wait(1) and proc.poll() is None and time.time() < deadline:
            pass
        assert ready.is_set(), f"not ready (exit code {proc.poll()}):\n{''.join(lines)[-4000:]}"
        assert requests.get(url.removesuffix("/v1") + "/health", timeout=30).ok
        assert complete(url, 2) == 200, "".join(lines)[-4000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=30)
    out = "".join(lines)
    assert proc.returncode == 0, out[-4000:]
    assert "stopped after" in out and "1 requests" in out, out[-4000:]
    with pytest.raises(requests.ConnectionError):
        requests.get(url.removesuffix("/v1") + "/health", timeout=5)


def test_admin_api_is_off_without_an_admin_key(server):
    _, url = server
    r = requests.get(url.removesuffix("/v1") + "/admin/adapters", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "admin_disabled"


def test_killed_replica_loses_at_most_the_requests_in_flight(server):
    import ray
    from ray import serve

    _, url = server
    handle = serve.get_deployment_handle("engine-base", app_name="rayft")
    victim = handle.actor_name.remote().result()
    victim_pid = handle.pid.remote().result()
    clients = 2  # requests in flight at any moment
    results: list[tuple[bool, int]] = []
    killed, stop = threading.Event(), threading.Event()

    def loop() -> None:
        for _ in range(400):  # bounded, whatever happens
            if stop.is_set():
                return
            results.append((killed.is_set(), complete(url, 4)))

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while sum(s == 200 for _, s in results) < 6 and time.time() < deadline:
        time.sleep(0.1)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=False)
    killed.set()
    deadline = time.time() + 120
    while sum(k and s == 200 for k, s in results) < 6 and time.time() < deadline:
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    failures = [s for _, s in results if s != 200]
    assert len(failures) <= clients, failures
    assert sum(k and s == 200 for k, s in results) >= 6  # the replacement serves
    assert handle.pid.remote().result() != victim_pid


def test_health_is_503_while_an_engine_is_down(server):
    """/health reads Serve's view of the engines: a killed replica (the only one) makes it 503
    with the engine named, until Serve's replacement runs."""
    import ray
    from ray import serve

    _, url = server
    health = url.removesuffix("/v1") + "/health"
    assert requests.get(health, timeout=30).json() == {"status": "ok", "engines": {"base": "ok"}}
    handle = serve.get_deployment_handle("engine-base", app_name="rayft")
    ray.kill(ray.get_actor(handle.actor_name.remote().result(), namespace="serve"))
    seen: list[tuple[int, dict]] = []
    deadline = time.time() + 120
    while time.time() < deadline:
        r = requests.get(health, timeout=30)
        seen.append((r.status_code, r.json()))
        if r.status_code == 200 and any(s == 503 for s, _ in seen):
            break
        time.sleep(0.2)
    down = [body for status, body in seen if status == 503]
    assert down, seen
    assert down[0]["status"] == "unavailable" and "engine base" in down[0]["reason"]
    assert seen[-1][0] == 200, seen[-5:]
    # Healthy again means serving again: the ingress reaches the replacement (this also leaves
    # the ingress's router knowing it, for the tests after this one).
    assert complete(url, 4) == 200


def test_backpressure_on_streams_is_a_503_before_the_stream_starts(server):
    _, url = server
    body = {"model": "base", "prompt": "hello", "max_tokens": 300, "stream": True}

    def stream() -> tuple[int, str]:
        r = requests.post(url + "/completions", json=body, timeout=120)
        return r.status_code, r.text

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: stream(), range(16)))
    assert {s for s, _ in results} <= {200, 503}, results
    # The ingress's own 503 (the engines' queues are full), not only the proxy's, and as an
    # OpenAI error body with a status, never as an error event inside a 200 stream.
    ours = [json.loads(t) for s, t in results if s == 503 and t.startswith("{")]
    assert any(e["error"]["code"] == "overloaded" for e in ours), results
    streamed = [t for s, t in results if s == 200]
    assert streamed and all(t.endswith("data: [DONE]\n\n") for t in streamed)
    assert not any('"error"' in t for t in streamed)


def test_backpressure_answers_503_not_an_unbounded_queue(server):
    _, url = server
    with ThreadPoolExecutor(24) as pool:
        statuses = list(pool.map(lambda _: complete(url, 400), range(24)))
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 1 and statuses.count(200) >= 2, statuses
    assert complete(url, 2) == 200
