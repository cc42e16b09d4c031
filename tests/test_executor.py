"""The in-process executor of a local run (engine ``ThreadExecutor``): dependencies passed as
values, failures passed on, no thread held while a task waits for its inputs, cancellation."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from wsi_nuclei.engine import ThreadExecutor


@pytest.fixture
def ex():
    e = ThreadExecutor(2)
    yield e
    e.close()


def test_a_task_gets_the_values_of_the_futures_it_was_given(ex: ThreadExecutor) -> None:
    order: list[str] = []

    def first() -> int:
        time.sleep(0.05)
        order.append("first")
        return 20

    def second(a: int, b: int) -> int:
        order.append("second")
        return a + b

    fa = ex.submit(first)
    fb = ex.submit(second, fa, 22)
    assert fb.result(timeout=10) == 42
    assert order == ["first", "second"]
    fb.release()  # the futures API run_strip uses


def test_a_failed_input_fails_the_task_without_running_it(ex: ThreadExecutor) -> None:
    ran: list[bool] = []

    def bad() -> None:
        raise ValueError("corrupt tile")

    def after(x: object) -> None:
        ran.append(True)

    f = ex.submit(after, ex.submit(bad))
    with pytest.raises(ValueError, match="corrupt tile"):
        f.result(timeout=10)
    assert ran == []


def test_a_waiting_task_holds_no_thread(ex: ThreadExecutor) -> None:
    """Two threads: one is busy, a second task waits for it; a third, independent task must
    still run (a pool thread blocked on the dependency would leave it queued)."""
    gate = threading.Event()
    blocker = ex.submit(gate.wait, 10)
    dependent = ex.submit(lambda ok: ok, blocker)
    free = ex.submit(lambda: "ran")
    try:
        assert free.result(timeout=5) == "ran"
        assert not dependent.done()
    finally:
        gate.set()
    assert dependent.result(timeout=10) is True


def test_wait_any_returns_when_one_is_done(ex: ThreadExecutor) -> None:
    gate = threading.Event()
    slow = ex.submit(gate.wait, 10)
    fast = ex.submit(lambda: 1)
    ex.wait_any([slow, fast])
    assert fast.done() and not slow.done()
    gate.set()
    ex.wait_any([])  # nothing to wait for: returns at once


def test_a_cancelled_task_never_runs_and_close_cancels_the_queued_ones() -> None:
    ex = ThreadExecutor(1)
    gate = threading.Event()
    ran: list[int] = []
    busy = ex.submit(gate.wait, 10)
    queued = ex.submit(ran.append, 1)
    after = ex.submit(ran.append, busy)  # waits for an input
    cancelled = ex.submit(ran.append, 2)
    assert cancelled.cancel()
    closer = threading.Thread(target=ex.close)
    closer.start()
    time.sleep(0.2)  # close has cancelled what had not started, and waits for `busy`
    gate.set()
    closer.join(10)
    assert not closer.is_alive()
    assert busy.result() is True
    assert queued.cancelled() and after.cancelled() and cancelled.cancelled()
    assert ran == []


class _Result:  # weakly referenceable stand-in for a batch's patches or maps
    pass


def test_finished_results_are_freed_without_the_garbage_collector(ex: ThreadExecutor) -> None:
    """A task's inputs are dropped once it has run: no reference cycle between a future and
    the task waiting for it keeps a batch's patches alive until the collector runs."""
    refs = []
    gc.disable()
    try:
        for _ in range(3):
            read = ex.submit(_Result)
            infer = ex.submit(lambda r: (refs.append(weakref.ref(r)), _Result())[1], read)
            maps = weakref.ref(infer.result(timeout=10))
            del read, infer
            time.sleep(0.05)  # the pool thread lets go of the finished task
            assert maps() is None
        assert [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()


# --------------------------------------------------------------------------------------------
# how many threads a run takes by default
# --------------------------------------------------------------------------------------------
def test_default_threads_follow_the_usable_cores() -> None:
    from wsi_nuclei.pipeline import resolve_threads

    assert resolve_threads(3, cores=16) == 3  # given: as given
    assert resolve_threads(0, cores=2) == 2
    assert resolve_threads(0, cores=1) == 1
    assert resolve_threads(0, cores=64) == 8  # capped
    assert resolve_threads(0, workers=4, cores=16) == 4  # shared out between worker processes
    assert resolve_threads(0, workers=8, cores=4) == 1


@pytest.mark.parametrize(
    ("files", "want"),
    [
        ({"cpu.max": "200000 100000\n"}, 2),
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 cores: rounded up
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage"}, None),
        ({}, None),
    ],
)
def test_container_cpu_quota(tmp_path, files: dict, want: int | None) -> None:
    import os

    from wsi_nuclei._cores import _cgroup_quota, usable_cores

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _cgroup_quota(tmp_path) == want
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path) == (min(affinity, want) if want else affinity)


def test_a_default_run_uses_the_resolved_threads_in_process(tmp_path) -> None:
    from wsi_nuclei._cores import usable_cores
    from wsi_nuclei.demo import SyntheticSlide
    from wsi_nuclei.pipeline import RunConfig, resolve_threads, run

    slide = SyntheticSlide(600, 600, mpp=0.25, tissue_fraction=1.0, seed=0)
    res = run(
        RunConfig(slide=slide, out=tmp_path / "out", model="classic", quiet=True, report=False)
    )
    n = resolve_threads(0, 1, usable_cores())
    assert res.manifest["scheduler"] == f"local in-process, {n} threads"


def test_the_outputs_do_not_depend_on_the_thread_count(tmp_path) -> None:
    """The default model on a synthetic slide with 1 and 3 threads: the same bytes (each CPU
    network call is single-threaded, blending is in patch order, blocks are saved by name)."""
    import hashlib

    from wsi_nuclei.demo import SyntheticSlide
    from wsi_nuclei.pipeline import RunConfig, run

    digests = []
    for threads in (1, 3):
        out = tmp_path / f"t{threads}"
        slide = SyntheticSlide(900, 700, mpp=0.25, tissue_fraction=1.0, seed=2)
        cfg = RunConfig(
            slide=slide, out=out, quiet=True, report=False, threads=threads, block_size=256
        )
        res = run(cfg)
        assert res.n_nuclei > 20
        assert res.manifest["scheduler"] == f"local in-process, {threads} threads"
        digests.append(
            [
                hashlib.sha256((out / name).read_bytes()).hexdigest()
                for name in ("nuclei.parquet", "nuclei.geojson.gz")
            ]
        )
    assert digests[0] == digests[1]


def test_run_json_names_a_dask_client_handed_in(tmp_path) -> None:
    """A library user's client with one (default) worker: the tasks go to Dask, and run.json
    says so instead of naming this process's threads."""
    from distributed import Client

    from wsi_nuclei.demo import SyntheticSlide
    from wsi_nuclei.pipeline import RunConfig, run

    slide = SyntheticSlide(600, 600, mpp=0.25, tissue_fraction=1.0, seed=0)
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as c:
        cfg = RunConfig(
            slide=slide, out=tmp_path / "out", model="classic", quiet=True, report=False, client=c
        )
        res = run(cfg)
    assert res.manifest["scheduler"] == "dask.distributed client given by the caller"
