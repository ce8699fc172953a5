"""Run a verifier as a child process on loopback: for demos, tests and benchmarks."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from privacy import StaticKey

from .cli import LISTENING


class VerifierStartError(RuntimeError):
    pass


class LocalVerifier:
    """A real verifier process (uvicorn on 127.0.0.1, a free port).

    Its key pair lives in a private temporary file, so ``restart()`` and any
    ``replica()`` serve the same public key (``public_key``) that edges pin.

    >>> with LocalVerifier(model="embedded") as v:
    ...     client = EdgeClient(v.url, verifier_key=v.public_key)
    """

    def __init__(self, model: str = "embedded", backend: str = "torch", threads: int | None = 1,
                 extra_args: list[str] | None = None, ready_timeout: float = 180.0,
                 key_file: str | Path | None = None, cpus: set[int] | None = None,
                 module: str = "cloud_verifier", stop_timeout: float = 10.0):
        self._tmp = None
        if key_file is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="pipesd-verifier-")
            key_file = Path(self._tmp.name) / "verifier.key"
            StaticKey.generate().save(key_file)
        self.key_file = Path(key_file)
        self.public_key = StaticKey.load(self.key_file).public_b64
        self.model, self.backend, self.threads = model, backend, threads
        self.extra_args = list(extra_args or [])
        self.ready_timeout = ready_timeout
        self.cpus = cpus            # pin the process (all its threads) to these cores
        self.module = module        # "cloud_verifier.ray_serve": the same verifier on a private Ray Serve
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.port = 0
        self.output: collections.deque[str] = collections.deque(maxlen=200)

    def _args(self) -> list[str]:
        args = [sys.executable, "-m", self.module, "--model", self.model, "--backend", self.backend,
                "--host", "127.0.0.1", "--port", str(self.port), "--key-file", str(self.key_file), *self.extra_args]
        return args + (["--threads", str(self.threads)] if self.threads else [])

    def start(self) -> "LocalVerifier":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cpus = self.cpus
        self.proc = subprocess.Popen(self._args(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
                                     start_new_session=True)   # its own process group: stop() reaps helpers too
        found = threading.Event()
        proc = self.proc

        def pump():
            for line in proc.stdout:
                self.output.append(line.rstrip())
                if not found.is_set() and line.startswith(LISTENING):
                    self.url = line.split()[-1]
                    self.port = int(self.url.rsplit(":", 1)[1])
                    found.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout
        while not found.wait(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise VerifierStartError("verifier did not start:\n" + "\n".join(self.output))
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise VerifierStartError("verifier never became ready:\n" + "\n".join(self.output))

    def stop(self) -> None:
        """Graceful stop (SIGTERM, then SIGKILL of the whole process group after ``stop_timeout``)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reap()

    def _reap(self) -> None:
        """Kill whatever the process left in its group (Ray's helper processes, if it died first)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def kill(self) -> None:
        """Abrupt stop (SIGKILL): no goodbye, sessions lost, as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reap()

    def restart(self) -> "LocalVerifier":
        """Kill and start again on the same port and key: every session is forgotten."""
        self.kill()
        return self.start()

    def replica(self) -> "LocalVerifier":
        """Another verifier process with the same model and key (not started)."""
        return LocalVerifier(self.model, self.backend, self.threads, self.extra_args, self.ready_timeout,
                             key_file=self.key_file, module=self.module, stop_timeout=self.stop_timeout)

    def __enter__(self) -> "LocalVerifier":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
