"""The round streams' worker threads (``edge_sdk.transport._StreamWorkers``): kept between rounds, grown
only to the most streams open at once, gone when the verifier is closed. Real threads, no verifier:
the HTTP path itself is covered by every test that generates through a real verifier."""

from __future__ import annotations

import threading

from edge_sdk.transport import _StreamWorkers


def _run_and_wait(workers: _StreamWorkers, job) -> None:
    done = threading.Event()

    def wrapped():
        try:
            job()
        finally:
            done.set()

    workers.submit(wrapped)
    assert done.wait(5), "the job never ran"


def _workers_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "stream-test"]


def test_rounds_one_after_another_reuse_one_thread():
    workers = _StreamWorkers(name="stream-test")
    ran_on = []
    for _ in range(20):
        _run_and_wait(workers, lambda: ran_on.append(threading.get_ident()))
    assert len(ran_on) == 20 and len(set(ran_on)) == 1
    workers.close()


def test_the_pool_grows_to_the_streams_open_at_once_and_no_further():
    workers = _StreamWorkers(name="stream-test")
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
    assert len(idents) == 3
    for _ in range(3):                      # a settled pool: later rounds start no thread
        done = threading.Event()
        _run_and_wait(workers, lambda: (idents.add(threading.get_ident()), done.set()))
    assert len(idents) == 3
    workers.close()


def test_close_ends_idle_workers_at_once_and_a_busy_one_after_its_stream():
    workers = _StreamWorkers(name="stream-test")
    _run_and_wait(workers, lambda: None)               # one idle worker
    release, busy = threading.Event(), threading.Event()
    workers.submit(lambda: (busy.set(), release.wait(5)))   # claims the idle one ...
    assert busy.wait(5)
    _run_and_wait(workers, lambda: None)               # ... so this one starts a second, then idles
    assert len(_workers_alive()) == 2
    workers.close()
    release.set()
    for t in _workers_alive():
        t.join(5)
    assert not _workers_alive()
