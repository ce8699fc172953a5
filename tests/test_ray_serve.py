"""The verifier on Ray Serve: two replicas behind Ray's proxy, session affinity, and a replica killed
mid-generation. A private local Ray (own temp dir, no dashboard, loopback); one cluster for the
module, shut down at the end. Bounded: every wait has a deadline, and Ray's start is ~10 s here.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import psutil
import pytest

pytest.importorskip("ray.serve", reason="the Ray extra is not installed (pip install 'pipesd[ray]')")

from cloud_verifier import LocalVerifier  # noqa: E402
from edge_sdk import EdgeClient  # noqa: E402

from .conftest import PROMPTS  # noqa: E402

pytestmark = pytest.mark.integration

MAX_NEW = 40
REPLICA = "ServeReplica:pipesd:verifier"


def replica_pids(fleet) -> list[int]:
    """This fleet's replica processes (descendants of its launcher, not any other Ray on the machine)."""
    try:
        family = psutil.Process(fleet.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    pids = []
    for proc in family:
        try:
            if REPLICA in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


@pytest.fixture(scope="module")
def fleet():
    v = LocalVerifier(model="embedded", threads=1, module="cloud_verifier.ray_serve", ready_timeout=240,
                      stop_timeout=90, extra_args=["--replicas", "2", "--cpus-per-replica", "0.5"])
    with v:
        assert len(replica_pids(v)) == 2
        family = psutil.Process(v.proc.pid).children(recursive=True)
        yield v
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"Ray left processes behind after shutdown: {[p.pid for p in alive]}"


@pytest.fixture(scope="module")
def references(target_greedy):
    """cloud_only on the plain verifier: the target decoding alone."""
    return {p: target_greedy(p, MAX_NEW) for p in PROMPTS[:6]}


def generate_in_parallel(fleet, n_clients, generations, on_first_done=None):
    """Each client generates `generations` prompts in turn; returns {(client, i): (prompt, result)}."""
    results, errors = {}, []
    started = threading.Barrier(n_clients + 1)
    first_done = threading.Semaphore(0)
    # offline="wait": a fleet's edge waits for the fleet (up to 60 s) rather than drafting on alone when a
    # round overruns its deadline while Ray replaces a replica (docs/scaling.md).
    clients = [EdgeClient(fleet.url, verifier_key=fleet.public_key, threads=1, mode="vanilla", offline="wait",
                          offline_wait_s=60) for _ in range(n_clients)]

    def run(i, client):
        try:
            started.wait(60)
            for j in range(generations):
                prompt = PROMPTS[(i + j) % 6]
                results[i, j] = prompt, client.generate(prompt, max_new_tokens=MAX_NEW)
                if j == 0:
                    first_done.release()
        except Exception as exc:   # reported with the client's index below
            errors.append((i, repr(exc)))
            first_done.release()

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    started.wait(60)
    if on_first_done is not None:
        for _ in clients:                      # every client holds a session on some replica
            assert first_done.acquire(timeout=120)
        on_first_done()
    for t in threads:
        t.join(300)
    for c in clients:
        c.close()
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    return results


def test_replicas_serve_the_same_verifier(fleet):
    assert httpx.get(f"{fleet.url}/health/ready", timeout=10).json()["status"] == "ready"
    info = httpx.get(f"{fleet.url}/v1/info", timeout=10).json()
    assert info["public_key"] == fleet.public_key          # one key pair for the whole fleet


def test_affinity_keeps_each_session_on_its_replica(fleet, references):
    results = generate_in_parallel(fleet, n_clients=6, generations=3)
    for prompt, r in results.values():
        assert r.tokens == references[prompt]
    # Six sessions over two replicas: without affinity about half of all requests would land on
    # the replica that does not hold the session and resync.
    assert sum(r.stats.resyncs for _, r in results.values()) == 0


def test_killing_a_replica_mid_generation_loses_no_token(fleet, references):
    killed = []

    def kill_one():
        pid = replica_pids(fleet)[0]
        os.kill(pid, signal.SIGKILL)        # a crash: no goodbye, its sessions are gone
        killed.append(pid)

    results = generate_in_parallel(fleet, n_clients=10, generations=5, on_first_done=kill_one)
    assert killed
    for prompt, r in results.values():
        assert r.stats.unverified_tokens == 0, f"emitted tokens the target never checked: {r.stats}"
        assert r.tokens == references[prompt], f"a generation diverged after the replica died: {r.stats}"
    assert sum(r.stats.resyncs for _, r in results.values()) > 0, \
        "no session lost its replica: the kill tested nothing"
    deadline = time.monotonic() + 120                  # Ray replaces the dead replica
    while len(replica_pids(fleet)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(replica_pids(fleet)) == 2 and killed[0] not in replica_pids(fleet)
