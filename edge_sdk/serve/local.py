"""``LocalServe``: a real ``pipesd serve`` process on loopback (a free port), for tests, benchmarks and apps
that want the endpoint without a shell.

>>> with LocalServe(["--verifier", v.url, "--verifier-key", v.public_key]) as s:
...     openai.OpenAI(base_url=s.url + "/v1", api_key="unused").completions.create(...)
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from . import LISTENING


class ServeStartError(RuntimeError):
    pass


class LocalServe:
    def __init__(self, args: list[str], ready_timeout: float = 120.0, cpus: set[int] | None = None):
        self.args, self.ready_timeout, self.cpus = list(args), ready_timeout, cpus
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.output: collections.deque[str] = collections.deque(maxlen=200)

    def start(self) -> "LocalServe":
        cmd = [sys.executable, "-m", "edge_sdk", "serve", "--port", "0", *self.args]
        cpus = self.cpus
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        found, proc = threading.Event(), self.proc

        def pump():
            for line in proc.stdout:
                self.output.append(line.rstrip())
                if not found.is_set() and line.startswith(LISTENING):
                    self.url = line.split()[-1]
                    found.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout
        while not found.wait(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServeStartError("pipesd serve did not start:\n" + "\n".join(self.output))
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        self.stop()
        raise ServeStartError("pipesd serve never answered /health:\n" + "\n".join(self.output))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)       # uvicorn's graceful shutdown
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "LocalServe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
