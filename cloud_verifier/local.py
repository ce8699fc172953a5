"""Run a verifier as a child process on loopback: for demos, tests and benchmarks."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
import time

import httpx

from .cli import LISTENING


class VerifierStartError(RuntimeError):
    pass


class LocalVerifier:
    """A real verifier process (uvicorn on 127.0.0.1, random free port).

    >>> with LocalVerifier(model="embedded") as v:
    ...     client = EdgeClient(verifier_url=v.url)
    """

    def __init__(self, model: str = "embedded", backend: str = "torch", threads: int | None = 1,
                 extra_args: list[str] | None = None, ready_timeout: float = 180.0):
        self.args = [sys.executable, "-m", "cloud_verifier", "--model", model, "--backend", backend,
                     "--host", "127.0.0.1", "--port", "0", *(extra_args or [])]
        if threads:
            self.args += ["--threads", str(threads)]
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.output: collections.deque[str] = collections.deque(maxlen=200)

    def start(self) -> "LocalVerifier":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        found = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.output.append(line.rstrip())
                if not found.is_set() and line.startswith(LISTENING):
                    self.url = line.split()[-1]
                    found.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise VerifierStartError("verifier did not start:\n" + "\n".join(self.output))
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise VerifierStartError("verifier never became ready:\n" + "\n".join(self.output))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "LocalVerifier":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
