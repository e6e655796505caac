"""No silent hangs: `cluster.stall_timeout` stops a stage that makes no progress while Ray waits
for resources it cannot give, with a diagnosis that names them.

The unit tests keep a task that asks for more CPUs than the session's Ray has pending, so the
watchdog has a reason to stop whatever stalls. The end-to-end test starves a real training run
the way issue 22 found it: a Ray of 2 CPUs, two training workers of one CPU each, and the Ray
Data task that would feed them waiting for a third.
"""

from __future__ import annotations

import signal
import textwrap
import time

import pytest
from train_data import free_port, run_result_script, write_sft

from rayft.cluster.watchdog import StalledError, Watchdog, beat, diagnose


@pytest.fixture
def unschedulable(ray_local):
    """A pending task that needs 64 CPUs (the session's Ray has 4), seen by the GCS."""
    ray = ray_local

    @ray.remote(num_cpus=64)
    def greedy():
        return None

    ref = greedy.remote()
    deadline = time.monotonic() + 30
    while not diagnose()[0]:
        assert time.monotonic() < deadline, "the pending task never showed in Ray's state"
        time.sleep(0.2)
    yield ref
    ray.cancel(ref)
    while diagnose()[0]:  # gone from the GCS's demands too, for the next test
        assert time.monotonic() < deadline + 60, diagnose()[1]
        time.sleep(0.2)


def test_the_diagnosis_names_what_waits_and_who_holds_it(unschedulable, ray_local):
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"CPU": 1}, {"CPU": 1}])
    ray_local.get(pg.ready(), timeout=30)
    try:
        blocked, text = diagnose({"the test's workers": [{"CPU": 1}] * 2})
    finally:
        remove_placement_group(pg)
    assert blocked
    assert "1 × task or actor waits for 64 CPU" in text, text  # no dashboard: shapes, no names
    assert "no node has 64 CPU (the largest has 4 CPU)" in text, text
    assert "CPU: the cluster has 4 CPU" in text, text
    assert "2 CPU held by the test's workers (2 × 1 CPU)" in text, text


def test_nothing_waiting_is_no_reason_to_stop(ray_local):
    blocked, text = diagnose()
    assert not blocked, text
    assert "Nothing waits for resources" in text


def test_ticks_keep_it_quiet_and_silence_stops_the_stage(unschedulable):
    # A handler left behind as Ray Train's fit leaves one (it never restores the previous):
    # it swallows SIGINT, and the watchdog must stop the stage all the same.
    stale = signal.signal(signal.SIGINT, lambda signum, frame: None)
    dog = Watchdog(1.5, "test step", stage="test")
    with pytest.raises(StalledError) as err, dog:
        end = time.monotonic() + 4
        while time.monotonic() < end:  # progress: 4 s, past the timeout twice over
            dog.tick()
            time.sleep(0.2)
        with dog.paused():  # the driver's own work does not count
            time.sleep(3)
        assert dog.diagnosis is None
        dog.tick()
        quiet = time.monotonic()
        time.sleep(30)  # the stage "hangs"; the watchdog interrupts this sleep
    stopped = time.monotonic() - quiet
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # given back
    signal.signal(signal.SIGINT, stale)
    assert 1.5 <= stopped < 10, stopped
    assert "test stalled: no test step for" in str(err.value)
    assert "64 CPU" in str(err.value)


def test_on_an_autoscaling_cluster_it_says_so_and_waits(unschedulable, capsys):
    with Watchdog(1, "test step", stage="test", autoscaling=True) as dog:
        time.sleep(4.5)
    assert dog.diagnosis is None
    out = capsys.readouterr().out
    said = out.count("waiting for the autoscaler to add nodes")
    assert 2 <= said <= 5, out  # once per timeout period
    assert "1 × task or actor waits for 64 CPU" in out


def test_beats_from_ray_workers_and_ray_data_blocks_are_progress(unschedulable, ray_local):
    import ray.data

    @ray_local.remote(num_cpus=0)
    def worker(key: str) -> None:
        for _ in range(14):  # 7 s of beats (beat writes at most once a second)
            beat(key)
            time.sleep(0.5)

    def slow(batch):
        time.sleep(2)
        return batch

    with Watchdog(5, "beat or block", stage="test") as dog:
        ray_local.get(worker.remote(dog.key))
        # Ray Data in the driver: a block every 2 s for ~8 s, no tick from the test
        rows = ray.data.range(4, override_num_blocks=4).map_batches(slow, concurrency=1).take_all()
    assert len(rows) == 4
    assert dog.diagnosis is None


STARVED = textwrap.dedent(
    """
    import json, sys, time
    import ray
    from rayft.config import JobConfig
    from rayft.errors import RayftError
    from rayft.training import train

    run_dir, port = sys.argv[1], int(sys.argv[2])
    # Exactly the CPUs the two workers take, and a dashboard: the waiting task has a name.
    ray.init(address="local", num_cpus=2, dashboard_port=port, log_to_driver=False)
    cfg = JobConfig.model_validate({
        "name": "starved", "run_dir": run_dir, "model": {"base": "tiny-llama"},
        "data": {"train_files": ["chat.jsonl"]},
        "training": {"max_steps": 2, "per_device_batch_size": 2},
        "cluster": {"num_workers": 2, "cpus_per_worker": 1, "stall_timeout": 20},
    })
    start = time.monotonic()
    try:
        train(cfg)
        error = None
    except RayftError as e:
        error = f"{type(e).__name__}: {e}"
    ended = time.monotonic()
    # the workers' placement group is gone: the stage's CPUs are back
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < ended + 60:
        time.sleep(0.5)
    free = ray.available_resources().get("CPU", 0)
    seconds = {"train": ended - start, "release": time.monotonic() - ended}
    print("RESULT " + json.dumps({"error": error, "seconds": seconds, "free_cpus": free}))
    ray.shutdown()
    """
)


@pytest.mark.slow
def test_a_starved_training_run_stops_naming_the_cpu(tiny_model, tmp_path):
    write_sft(tmp_path, tiny_model, n_train=32, n_val=0)
    result = run_result_script(STARVED, str(tmp_path), str(free_port()), timeout=400)
    error = result["error"]
    assert error and error.startswith("StalledError: train stalled: no training step for"), error
    stalled_for = float(error.split("no training step for ")[1].split(" s")[0])
    assert 20 <= stalled_for < 45, error  # the timeout, polls, a second look, a slow machine
    assert "waits for 1 CPU" in error, error
    assert "CPU: the cluster has 2 CPU, 0 CPU free" in error, error
    assert "2 CPU held by the training workers' placement group (2 × 1 CPU)" in error, error
    assert "cluster.num_workers" in error, error
    assert result["free_cpus"] == 2, result
    print(error, result["seconds"])
