"""The round streams' worker threads (``edge_sdk.transport._StreamWorkers``): kept between rounds, grown
only to the streams open at once, gone when the verifier is closed. Real threads, no verifier: the HTTP
path itself is covered by every test that generates through a real verifier.

A worker is back in the queue a moment after its job's last effect is visible; a job submitted in that
moment starts another thread (the pool may grow by one). The tests wait for the workers to be idle where
they assert reuse, so that they check the pool's accounting, not the scheduler's timing."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from edge_sdk.transport import _StreamWorkers

_names = itertools.count()


@pytest.fixture
def pool():
    name = f"stream-test-{next(_names)}"
    workers = _StreamWorkers(name=name)
    try:
        yield workers, name
    finally:
        workers.close()


def _alive(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def _idle(workers: _StreamWorkers, n: int) -> None:
    """Wait until `n` workers are back in the queue."""
    deadline = time.monotonic() + 5
    while workers._idle != n:
        assert time.monotonic() < deadline, f"{workers._idle} workers idle, expected {n}"
        time.sleep(0.001)


def _run(workers: _StreamWorkers, job) -> None:
    done = threading.Event()
    workers.submit(lambda: (job(), done.set()))
    assert done.wait(5), "the job never ran"


def test_rounds_one_after_another_reuse_one_thread(pool):
    workers, name = pool
    ran_on = []
    for _ in range(20):
        _run(workers, lambda: ran_on.append(threading.get_ident()))
        _idle(workers, 1)
    assert len(ran_on) == 20 and len(set(ran_on)) == 1 and len(_alive(name)) == 1


def test_the_pool_grows_to_the_streams_open_at_once_and_no_further(pool):
    workers, name = pool
    release, started, idents = threading.Event(), threading.Semaphore(0), set()
    lock = threading.Lock()

    def stream():
        with lock:
            idents.add(threading.get_ident())
        started.release()
        release.wait(5)

    for _ in range(3):                      # three streams open at once: three threads
        workers.submit(stream)
    for _ in range(3):
        assert started.acquire(timeout=5)
    release.set()
    _idle(workers, 3)
    assert len(idents) == 3
    for _ in range(3):                      # a settled pool: later rounds start no thread
        _run(workers, lambda: idents.add(threading.get_ident()))
        _idle(workers, 3)
    assert len(idents) == 3 and len(_alive(name)) == 3


def test_a_job_that_raises_leaves_its_worker_alive(pool):
    workers, name = pool
    workers.submit(lambda: 1 / 0)           # logged; the worker goes back to the queue
    _idle(workers, 1)
    _run(workers, lambda: None)
    assert len(_alive(name)) == 1


def test_close_ends_idle_workers_at_once_and_a_busy_one_after_its_stream(pool):
    workers, name = pool
    _run(workers, lambda: None)
    _idle(workers, 1)                                   # one idle worker
    release, busy = threading.Event(), threading.Event()
    workers.submit(lambda: (busy.set(), release.wait(5)))   # claims it ...
    assert busy.wait(5)
    _run(workers, lambda: None)                         # ... so this one starts a second, then idles
    _idle(workers, 1)
    assert len(_alive(name)) == 2
    workers.close()
    release.set()
    for t in _alive(name):
        t.join(5)
    assert not _alive(name)
