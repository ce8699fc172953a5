"""Shared fixtures: one real verifier process per test session, real models, loopback only.

Tests marked ``integration`` load a real model file and usually talk to a real verifier process;
a test that asks for the ``verifier`` or ``client`` fixture is marked so here. Everything else --
policies, the engine's logic on the toy pair (tests/engine_kit.py), the wire, the pure pieces --
runs in seconds: ``make test-fast`` (``pytest -m "not integration"``).
"""

from __future__ import annotations

import pytest

from cloud_verifier import LocalVerifier
from edge_sdk import EdgeClient

# Code-like prompts in the style of the embedded pair's training text (CPython sources),
# plus a few that are not code at all.
PROMPTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\n",
    "class Stack:\n    def __init__(self):\n",
    "    def __repr__(self):\n        return ",
    "for i in range(10):\n",
    'if __name__ == "__main__":\n',
    "def read_file(path):\n    with open(path) as f:\n",
    "try:\n    import threading\nexcept ImportError:\n",
    '        raise ValueError("',
    '"""Utilities for',
    "def _check_arg(name, value):\n    if not isinstance(value, int):\n",
    "        return self._",
    "from collections import",
    "# Copyright (C) 2001",
    "class Error(Exception):\n",
    "    @property\n    def name(self):\n",
    "def main(argv=None):\n    parser = argparse.",
    "        for key, value in",
    "    def close(self):\n        if self.",
    "__all__ = [",
    "def encode(s, encoding='utf-8'):\n",
    "The quick brown fox",
]


def pytest_collection_modifyitems(items):
    for item in items:
        if {"verifier", "client", "target_greedy"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def verifier():
    """The embedded target served by a real uvicorn process on 127.0.0.1 (random port)."""
    with LocalVerifier(model="embedded", threads=1) as v:
        yield v


@pytest.fixture(scope="session")
def client(verifier):
    with EdgeClient(verifier.url, verifier_key=verifier.public_key, threads=1) as c:
        yield c


GREEDY_LONGEST = 48


@pytest.fixture(scope="session")
def target_greedy(client):
    """``target_greedy(prompt, n)``: the target's own greedy decoding of `prompt` (``cloud_only``), its first
    `n` <= 48 new tokens: what every lossless policy must reproduce token for token.

    One 48-token run per prompt for the whole session, sliced: greedy decoding's first n tokens do not
    depend on how many more are asked for. Several modules compare against the same prompts; each
    used to decode them again (~12 s a module)."""
    runs: dict[str, list[int]] = {}

    def greedy(prompt: str, n: int) -> list[int]:
        if not 0 < n <= GREEDY_LONGEST:
            raise ValueError(f"target_greedy keeps {GREEDY_LONGEST} tokens a prompt, not {n}")
        if prompt not in runs:
            runs[prompt] = client.generate(prompt, max_new_tokens=GREEDY_LONGEST, mode="cloud_only").tokens
        return runs[prompt][:n]

    return greedy
