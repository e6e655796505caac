"""/health under load: a saturated engine is busy, not down.

Its own application: the engine's batches wait 15 s to fill, so two requests hold both of
its request slots (max_ongoing_requests: 2) for that long, whatever the machine's speed.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests
from test_serve_api import free_port

from rayft.config import JobConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(ray_local, tiny_model, tmp_path_factory):
    from rayft.serving import start, stop

    cfg = JobConfig(
        run_dir=str(tmp_path_factory.mktemp("serve_health")),
        model={"base": tiny_model},
        serve={
            "port": free_port(),
            "max_ongoing_requests": 2,
            "max_queued_requests": 8,
            "max_batch_size": 8,
            "batch_wait_ms": 15_000,
        },
    )
    url = start(cfg)
    yield cfg, url
    stop()


def test_health_is_200_while_every_replica_slot_is_busy(server):
    """Before, /health pinged the engine through its request queue: with every slot taken the
    ping waited behind the requests and /health answered 503 while the engine served."""
    _, url = server
    health = url.removesuffix("/v1") + "/health"
    body = {"model": "base", "prompt": "hello", "max_tokens": 2, "temperature": 0}
    answers: list[int] = []

    def complete() -> None:
        answers.append(requests.post(url + "/completions", json=body, timeout=120).status_code)

    clients = [threading.Thread(target=complete) for _ in range(2)]
    for c in clients:
        c.start()
    seen: list[tuple[int, dict]] = []
    deadline = time.time() + 120
    while any(c.is_alive() for c in clients) and time.time() < deadline:
        r = requests.get(health, timeout=60)
        seen.append((r.status_code, r.json()))
        time.sleep(0.5)
    for c in clients:
        c.join()
    assert answers == [200, 200]  # the engine was busy serving, not down
    assert len(seen) >= 3, seen  # /health was asked while both requests were in the engine
    assert all(s == (200, {"status": "ok", "engines": {"base": "ok"}}) for s in seen), seen
