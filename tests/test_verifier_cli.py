"""`pipesd-verifier` as a new user starts it (real processes, loopback only).

A model that cannot load ends the process at once with one line on stderr naming the path and the
reason -- no traceback, and no ``listening`` line first (a server answering ``not_ready`` forever
was the old behaviour). A good model says what start-up is doing on stdout, and the libraries'
own output (transformers' progress bars, llama.cpp's log) stays off stderr unless ``--verbose``.
"""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import pipesd_models
from cloud_verifier.cli import LISTENING, PUBLIC_KEY
from edge_sdk import EdgeClient

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 60.0           # a bound, not an expectation: these start in 1-10 s


def verifier_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "cloud_verifier", "--host", "127.0.0.1", "--port", "0", "--threads", "1", *args]


@pytest.fixture(scope="module")
def bad_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "bad.gguf"
    path.write_bytes(b"this is not a model\x00\x01\x02\x03")
    return path


@pytest.mark.parametrize("backend", ["torch", "llamacpp"])
@pytest.mark.parametrize("model", ["corrupt", "missing"])
def test_a_model_that_cannot_load_ends_the_verifier_with_one_line(bad_gguf, backend, model):
    path = bad_gguf if model == "corrupt" else bad_gguf.with_name("missing.gguf")
    proc = subprocess.run(verifier_args("--model", str(path), "--backend", backend),
                          capture_output=True, text=True, timeout=START_TIMEOUT_S)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"pipesd-verifier: cannot load the target model {path}: ")
    reason = lines[0].split(f"{path}: ", 1)[1]
    if model == "missing":
        assert reason == "no such file or directory"
    else:
        assert reason.startswith("not a GGUF file " + ("transformers" if backend == "torch" else "llama.cpp"))
    everything = proc.stdout + proc.stderr
    assert "Traceback" not in everything and "listening" not in everything


@contextmanager
def running_verifier(tmp_path: Path, *args: str) -> Iterator[tuple[str, str, list[str], Path]]:
    """A verifier process with stdout read line by line and stderr kept in a file:
    yields (url, public key, stdout lines so far, stderr file); stops it (SIGTERM) on exit."""
    err_path = tmp_path / "verifier.stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(verifier_args(*args), stdout=subprocess.PIPE, stderr=err, text=True)
    out: list[str] = []
    listening = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            out.append(line.rstrip("\n"))
            if line.startswith(LISTENING):
                listening.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not listening.wait(0.1):
            assert proc.poll() is None and time.monotonic() < deadline, \
                "\n".join(out) + err_path.read_text()
        url = next(line for line in out if line.startswith(LISTENING)).split()[-1]
        key = next(line for line in out if line.startswith(PUBLIC_KEY)).split()[-1]
        yield url, key, out, err_path
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("backend", ["torch", "llamacpp"])
def test_start_up_says_what_it_does_and_nothing_else_reaches_stderr(tmp_path, backend):
    with running_verifier(tmp_path, "--backend", backend) as (url, key, out, err_path):
        # A session makes the target build its per-session state (a llama.cpp context: it logged then).
        with EdgeClient(url, verifier_key=key, threads=1) as client:
            assert len(client.generate("def f():\n", max_new_tokens=4, mode="cloud_only").tokens) == 4
    assert out[0] == f"pipesd-verifier: loading model {pipesd_models.target_path()} ({backend})..."
    assert re.fullmatch(r"pipesd-verifier: model ready in \d+\.\d s", out[1]), out
    assert [line.split()[1] for line in out[2:4]] == [PUBLIC_KEY.split()[1], LISTENING.split()[1]]
    assert err_path.read_text() == ""          # no tqdm bar, no llama.cpp log line, no warning


def test_verbose_lets_the_libraries_speak(tmp_path):
    with running_verifier(tmp_path, "--backend", "llamacpp", "--verbose") as (_, _, out, err_path):
        pass
    assert out[1].startswith("pipesd-verifier: model ready in ")
    assert "llama_model_loader" in err_path.read_text()


def test_load_errors_are_typed_and_name_the_path(bad_gguf):
    from cloud_verifier import ModelLoadError, load_target

    with pytest.raises(ModelLoadError) as caught:
        load_target(bad_gguf, "llamacpp", threads=1)
    err = caught.value
    assert err.path == bad_gguf and err.backend == "llamacpp" and isinstance(err, ValueError)
    assert str(err).startswith(f"cannot load the target model {bad_gguf}: not a GGUF file llama.cpp can read (")
    assert err.__cause__ is not None                   # the library's own exception stays reachable
    assert str(pickle.loads(pickle.dumps(err))) == str(err)
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_target(bad_gguf.with_name("missing.gguf"), "llamacpp")


def test_quiet_libraries_silences_llama_cpp_log(capfd):
    from cloud_verifier.target import LlamaCppTarget, quiet_libraries

    quiet_libraries("llamacpp")
    target = LlamaCppTarget(pipesd_models.target_path(), threads=1)
    target.logits(target.new_state(), [1, 2, 3], 0)
    assert capfd.readouterr().err == ""      # it printed "llama_context: n_ctx_seq (...) > n_ctx_train (0)"


def test_a_ray_replica_quiets_the_libraries_as_the_cli_does(tmp_path):
    """A Serve replica loads its target in its own process: without --verbose the libraries' own output
    (transformers' warnings and bars) is off there too, as in pipesd-verifier."""
    from transformers.utils import logging as hf_logging

    from cloud_verifier import VerifierSettings
    from cloud_verifier.ray_serve import VerifierReplica
    from privacy import StaticKey

    key = tmp_path / "verifier.key"
    StaticKey.generate().save(key)
    hf_logging.set_verbosity_warning()
    VerifierReplica("embedded", "torch", 1, VerifierSettings(), str(key), None, verbose=True)
    assert hf_logging.get_verbosity() == hf_logging.WARNING            # --verbose: left as it was
    VerifierReplica("embedded", "torch", 1, VerifierSettings(), str(key), None)
    assert hf_logging.get_verbosity() == hf_logging.ERROR
