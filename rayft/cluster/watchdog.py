"""No silent hangs: a stage that makes no progress for `cluster.stall_timeout` seconds is
stopped with what Ray is waiting for and who holds it.

The classic case: on a cluster with 2 CPUs, two training workers of one CPU each hold both, and
the Ray Data task that would feed them waits for a CPU forever while the run prints nothing.
Progress is what the stage reports: `Watchdog.tick()` in the driver, `beat(key)` in a Ray
worker (a key in Ray's GCS key-value store, which every node reaches; the driver polls it),
and every Ray Data execution that runs in the driver (a block produced or taken).

A stall alone does not prove a hang (a slow first step, a long download): the watchdog stops
the stage only when Ray also has work it cannot schedule, still there a moment later (else it
prints what it sees, once per timeout period). It then records the diagnosis and
sends SIGINT to the main thread, where the stage is blocked in `trainer.fit()` or a Ray Data
execution (Ray Train's own SIGINT handler aborts its controller and workers, releasing their
placement group); leaving the `with` block turns whatever that raised into `StalledError`.
With `cluster.autoscaling` it only says it is waiting for nodes, once per timeout period.

Ray's state: the autoscaler's view from the GCS (`get_cluster_status`: pending demands, each
node's usage) and the placement group table work with and without the dashboard; the names of
the waiting tasks and actors come from the state API, which needs the dashboard, and are left
out without it.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback

from rayft.errors import RayftError

NAMESPACE = "rayft"
_watching: Watchdog | None = None  # the one whose `with` block is running in this process
_beats: dict[str, float] = {}  # key -> when this process last wrote it


class StalledError(RayftError):
    """No progress for cluster.stall_timeout while Ray waited for resources it cannot give."""


def beat(key: str | None) -> None:
    """Progress from inside a Ray worker (at most one GCS write a second per key)."""
    if not key or time.monotonic() - _beats.get(key, -1e9) < 1.0:
        return
    from ray.experimental.internal_kv import _internal_kv_put

    _beats[key] = time.monotonic()
    with contextlib.suppress(Exception):  # a missed beat is no reason to fail a step
        _internal_kv_put(key, str(time.time_ns()), namespace=NAMESPACE)


class Watchdog:
    """`with Watchdog(...) as dog:` around the part of a stage that waits on Ray; call
    `dog.tick()` on progress in the driver or hand `dog.key` to workers for `beat`.

    `progress` names what progress is ("training step"); `holders` names placement groups by
    their bundles ({"the training workers' placement group": [{"CPU": 1}, {"CPU": 1}]});
    `fix` is the stage's advice when its work cannot be scheduled."""

    def __init__(
        self,
        timeout: float,
        progress: str,
        *,
        stage: str,
        autoscaling: bool = False,
        holders: dict[str, list[dict[str, float]]] | None = None,
        fix: str = "",
    ) -> None:
        self.timeout = timeout
        self.progress, self.stage, self.autoscaling = progress, stage, autoscaling
        self.holders = holders or {}
        self.fix = fix or "free what other jobs hold, or add nodes"
        # where workers `beat`; None when off (cluster.stall_timeout: 0)
        self.key = f"progress-{uuid.uuid4().hex}" if timeout > 0 else None
        self.diagnosis: str | None = None  # set when the watchdog stopped the stage
        self._last = self._said = time.monotonic()
        self._paused = 0
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._sigint: Any = None
        self._main = False  # whether the `with` block runs in the main thread
        self._seen: bytes | None = None  # the last beat read

    def tick(self) -> None:
        self._last = time.monotonic()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Driver-only work (no Ray involved) that may take longer than the timeout."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self.tick()

    def __enter__(self) -> Watchdog:
        global _watching
        if self.timeout <= 0:
            return self
        self._main = threading.current_thread() is threading.main_thread()
        if self._main and signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            # A process started in the background ignores SIGINT, and Ray Train's fit leaves
            # its own handler behind (it aborts that run's controller, long gone): either way
            # nothing would stop the stage. Ray Train installs its handler again during fit.
            self._sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        from ray.data import DataContext

        classes = DataContext.get_current().custom_execution_callback_classes
        if _DataProgress not in classes:
            classes.append(_DataProgress)
        _watching = self
        self.tick()
        self._thread = threading.Thread(target=self._watch, name="rayft-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        global _watching
        if self._thread is None:
            return
        with self._lock:  # no SIGINT after this point
            self._done.set()
        try:
            self._thread.join(timeout=1)  # it may be reading Ray's state: it stops by itself
            _watching = None
            from ray.data import DataContext

            classes = DataContext.get_current().custom_execution_callback_classes
            if _DataProgress in classes:
                classes.remove(_DataProgress)
            if self._sigint is not None:
                signal.signal(signal.SIGINT, self._sigint)
            if ray.is_initialized():
                from ray.experimental.internal_kv import _internal_kv_del

                _internal_kv_del(self.key, namespace=NAMESPACE)
        except BaseException:  # the SIGINT this watchdog sent, arriving late
            if self.diagnosis is None:
                raise
        if self.diagnosis is not None:
            # Whatever the interrupted stage raised (KeyboardInterrupt; SystemExit from Ray
            # Train's handler; the aborted controller's error) is this.
            raise StalledError(self.diagnosis) from None

    def _watch(self) -> None:
        interval = min(5.0, max(0.2, self.timeout / 10))
        while not self._done.wait(interval):
            self._read_beats()
            now = time.monotonic()
            if self._paused or now - max(self._last, self._said) < self.timeout:
                continue
            self._said = now
            blocked, state = diagnose(self.holders)
            if blocked and not self.autoscaling and self._main:
                # A demand seen once may be a worker process that is still starting: before
                # stopping the stage, it must still be there a moment later, with no progress.
                last = self._last
                if self._done.wait(min(5.0, self.timeout / 4)):
                    return
                self._read_beats()
                if self._last != last:
                    continue
                blocked, state = diagnose(self.holders)
            stalled = f"no {self.progress} for {time.monotonic() - self._last:.0f} s"
            if not blocked:
                print(
                    f"[rayft {self.stage}] {stalled}, but Ray has nothing it cannot schedule: "
                    f"still waiting (a slow step or download; a hang if this repeats).\n{state}",
                    flush=True,
                )
            elif self.autoscaling or not self._main:
                why = (
                    "waiting for the autoscaler to add nodes (cluster.autoscaling)"
                    if self.autoscaling
                    else "cannot stop the stage outside the main thread"
                )
                print(f"[rayft {self.stage}] {stalled}: {why}.\n{state}", flush=True)
            else:
                self._stop(
                    f"{self.stage} stalled: {stalled} (cluster.stall_timeout: "
                    f"{self.timeout:g} s), and Ray cannot schedule what the stage waits for."
                    f"\n{state}\nFix: {self.fix}; with cluster.autoscaling: true the stage "
                    "waits for new nodes instead."
                )
                return

    def _read_beats(self) -> None:
        """A new value under `key`: a worker's `beat`."""
        from ray.experimental.internal_kv import _internal_kv_get

        try:
            value = _internal_kv_get(self.key, namespace=NAMESPACE)
        except Exception:  # the GCS away for a moment: no news is not progress
            return
        if value is not None and value != self._seen:
            self._seen = value
            self.tick()

    def _stop(self, diagnosis: str) -> None:
        """Interrupt the main thread until it leaves the `with` block (Ray Train aborts
        gracefully on the first SIGINT, and exits on the third)."""
        with self._lock:
            if self._done.is_set():
                return
            self.diagnosis = diagnosis
        print(
            f"[rayft {self.stage}] stopping the stage: it stalled (the reason follows)", flush=True
        )
        while True:
            with self._lock:
                if self._done.is_set():
                    return
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            if self._done.wait(15):
                return


class _DataProgress(ExecutionCallback):
    """Ticks the running watchdog when a Ray Data execution in this process moves a block
    (an operator produced an output, or one was taken from it). Ray Data instantiates it per
    execution from `DataContext.custom_execution_callback_classes`."""

    def __init__(self) -> None:
        self.moved = -1

    def on_execution_step(self, executor) -> None:
        dog = _watching
        if dog is None:
            return
        moved = sum(
            op.metrics.num_task_outputs_generated + op.metrics.num_outputs_taken
            for op in executor._topology
        )
        if moved != self.moved:
            self.moved = moved
            dog.tick()


def diagnose(holders: dict[str, list[dict[str, float]]] | None = None) -> tuple[bool, str]:
    """(whether Ray has demands it cannot schedule, what waits and who holds the resources)."""
    try:
        return _diagnose(holders or {})
    except Exception as e:  # the watchdog must outlive a state API that changed or is down
        return False, f"(Ray's state could not be read: {e!r})"


def _diagnose(holders: dict[str, list[dict[str, float]]]) -> tuple[bool, str]:
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    nodes = [_usage(n) for n in [*status.active_nodes, *status.idle_nodes]]
    demands = status.resource_demands
    # What waits, as the GCS reports it to the autoscaler: the raylets' queued demands. The
    # state API's pending tasks and actors also count those merely starting (no resources).
    waiting = [
        ("task or actor", r.bundle)
        for d in demands.ray_task_actor_demand
        for r in d.bundles_by_count
        for _ in range(r.count)
    ]
    waiting = (_pending_named() or waiting) if waiting else []  # by name where it answers
    lines = [f"{n} × {what} waits for {_shape(need)}" for (what, need), n in _count(waiting)]
    for pg in demands.placement_group_demand:
        bundles = [r.bundle for r in pg.bundles_by_count for _ in range(r.count)]
        lines.append(
            f"placement group {pg.pg_id[:8]} ({pg.strategy}) waits for {_bundles(bundles)}"
        )
        waiting += [("placement group", b) for b in bundles]
    if not lines:
        return False, "Nothing waits for resources." + _held_lines(nodes, {"CPU"}, holders)
    needs = {tuple(sorted(_need(shape).items())) for _, shape in waiting}
    for need in map(dict, sorted(needs)):
        if any(all(total.get(k, 0) >= v for k, v in need.items()) for total, _ in nodes):
            continue
        short = [(k, v) for k, v in need.items() if max(t.get(k, 0) for t, _ in nodes) < v]
        for k, v in short:
            most = max(t.get(k, 0) for t, _ in nodes)
            lines.append(f"no node has {_amount(k, v)} (the largest has {_amount(k, most)})")
        if not short:
            lines.append(f"no node has {_shape(need)} at once")
    names = {k for need in needs for k, _ in need}
    return True, "Waiting:\n  " + "\n  ".join(lines) + _held_lines(nodes, names, holders)


def _pending_named() -> list[tuple[str, dict[str, float]]] | None:
    """Waiting tasks and actors by name, from the state API (None without a dashboard)."""
    try:
        from ray.util.state import list_actors, list_tasks

        address = ray.get_runtime_context().gcs_address
        kw: dict[str, Any] = {"address": address, "detail": True, "timeout": 10}
        tasks = list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], **kw)
        actors = list_actors(filters=[("state", "=", "PENDING_CREATION")], **kw)
    except Exception:
        return None
    named = [(f"task {t.name}", t.required_resources or {}) for t in tasks] + [
        (f"actor {a.class_name}", a.required_resources or {}) for a in actors
    ]
    return [(what, shape) for what, shape in named if _need(shape)]


def _held_lines(
    nodes: list[tuple[dict[str, float], dict[str, float]]],
    names: set[str],
    holders: dict[str, list[dict[str, float]]],
) -> str:
    """Per resource: the cluster's total and free, what each placement group reserves, and
    what tasks and actors outside placement groups use."""
    groups = [
        (_holder(pg, holders), list(pg["bundles"].values()))
        for pg in ray.util.placement_group_table().values()
        if pg["state"] == "CREATED"
    ]
    out = []
    for name in sorted(names):
        total = sum(n[0].get(name, 0) for n in nodes)
        used = sum(n[1].get(name, 0) for n in nodes)
        parts = [f"{_amount(name, total - used)} free"]
        reserved = 0.0
        for label, bundles in groups:
            amount = sum(b.get(name, 0) for b in bundles)
            if amount:
                reserved += amount
                parts.append(f"{_amount(name, amount)} held by {label} ({_bundles(bundles)})")
        if used - reserved > 0:
            parts.append(f"{_amount(name, used - reserved)} by tasks and actors outside them")
        out.append(f"{name}: the cluster has {_amount(name, total)}, " + ", ".join(parts))
    return "".join(f"\n{line}" for line in out)


def _holder(pg: dict[str, Any], holders: dict[str, list[dict[str, float]]]) -> str:
    bundles = _key(list(pg["bundles"].values()))
    for label, known in holders.items():
        if _key(known) == bundles:
            return label
    name = f" '{pg['name']}'" if pg.get("name") else ""
    return f"placement group{name} {pg['placement_group_id'][:8]} ({pg['strategy']})"


def _key(bundles: list[dict[str, float]]) -> list[tuple]:
    return sorted(tuple(sorted((k, float(v)) for k, v in b.items() if v)) for b in bundles)


def _usage(node) -> tuple[dict[str, float], dict[str, float]]:
    """(total, used) of a node's plain resources (not placement groups' own names)."""
    usage = [u for u in node.resource_usage.usage if _plain(u.resource_name) == u.resource_name]
    return {u.resource_name: u.total for u in usage}, {u.resource_name: u.used for u in usage}


_GROUP = re.compile(r"_group_(\d+_)?[0-9a-f]{16,}$")


def _plain(resource: str) -> str:
    """CPU_group_0_<id> (a placement group's bundle) -> CPU."""
    return _GROUP.sub("", resource)


def _count(items: list[tuple[str, dict[str, float]]]) -> list[tuple[tuple, int]]:
    counts = Counter((what, tuple(sorted(s.items()))) for what, s in items)
    return [((what, dict(shape)), n) for (what, shape), n in sorted(counts.items())]


def _need(shape: dict[str, float]) -> dict[str, float]:
    """The plain resources a shape asks for (not the markers of nodes and bundles)."""
    need: dict[str, float] = {}
    for k, v in shape.items():
        if v and not k.startswith(("bundle_group", "node:")):
            need[_plain(k)] = need.get(_plain(k), 0) + v
    return need


def _shape(shape: dict[str, float]) -> str:
    return " + ".join(_amount(k, v) for k, v in sorted(_need(shape).items())) or "nothing"


def _bundles(bundles: list[dict[str, float]]) -> str:
    counts = Counter(_shape(b) for b in bundles)
    return ", ".join(f"{n} × {shape}" for shape, n in counts.items())


def _amount(resource: str, value: float) -> str:
    if resource in ("memory", "object_store_memory"):
        return f"{value / 2**30:.1f} GiB {resource}"
    return f"{value:g} {resource}"
