"""What a new user hits on day one (issue 23): each mistake gives one clear line and the right exit code.

Real `pipesd` processes (`python -m edge_sdk`), a real verifier on loopback where one is needed; the
unreachable verifier is a closed port on 127.0.0.1. Every run checks that stderr holds no traceback
and no llama.cpp log line.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import pipesd_models
from edge_sdk import ConfigError, EdgeClient
from edge_sdk.chat import PLAIN_STOP

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
KEY = base64.b64encode(bytes(range(32))).decode()     # a valid X25519 public key no verifier holds
CLOSED = "http://127.0.0.1:1"                         # nothing listens on port 1
NOISE = ("Traceback", "llama_", "ggml_", "decode:", "load_tensors")


def pipesd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "edge_sdk", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    for noise in NOISE:
        assert noise not in proc.stderr, f"{noise!r} on stderr:\n{proc.stderr}"
    return proc


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("pipesd: ")
    return lines[0]


def test_a_url_without_scheme_is_refused_before_anything_runs():
    proc = pipesd("generate", "x", "--verifier", "127.0.0.1:8000", "--verifier-key", KEY)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "http://127.0.0.1:8000" in error_line(proc)
    with pytest.raises(ConfigError, match="http://"):
        EdgeClient("127.0.0.1:8000", verifier_key=KEY)
    for bad in ("http://", "ftp://host:1", "http://host:99999"):
        with pytest.raises(ConfigError):
            EdgeClient(bad, verifier_key=KEY)


def test_an_unreachable_verifier_stops_with_one_line_unless_told_to_continue():
    proc = pipesd("generate", "def f():", "--verifier", CLOSED, "--verifier-key", KEY, "--max-new-tokens", "8")
    assert proc.returncode == 3 and proc.stdout.strip() == ""          # no unverified text by default
    line = error_line(proc)
    assert CLOSED in line and "--offline continue" in line
    proc = pipesd("generate", "def f():", "--verifier", CLOSED, "--verifier-key", KEY, "--max-new-tokens", "8",
                  "--offline", "continue")
    assert proc.returncode == 0 and proc.stdout.strip()
    warning = [line for line in proc.stderr.splitlines() if line.startswith("pipesd: warning")]
    assert len(warning) == 1 and "8 of 8 tokens" in warning[0] and "unverified" in warning[0]


def test_the_sdk_raises_under_offline_fail_and_yields_unverified_tokens_under_continue():
    from edge_sdk import VerifierUnavailable

    with EdgeClient(CLOSED, verifier_key=KEY, offline="fail", threads=1) as client:
        with pytest.raises(VerifierUnavailable):
            client.generate("def f():", max_new_tokens=4)
    with EdgeClient(CLOSED, verifier_key=KEY, threads=1) as client:      # the SDK's default: continue
        r = client.generate("def f():", max_new_tokens=4)
        assert len(r.tokens) == 4 and r.stats.unverified_tokens == 4


def test_a_wrong_verifier_key_names_the_key_not_a_status(verifier):
    proc = pipesd("generate", "x", "--verifier", verifier.url, "--verifier-key", KEY, "--max-new-tokens", "4")
    assert proc.returncode == 3 or proc.returncode == 2
    line = error_line(proc)
    assert "handshake" in line and "key" in line and "200" not in line


def test_model_and_key_files_that_cannot_be_read(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    proc = pipesd("generate", "x", "--mode", "edge_only", "--draft-model", str(bad))
    assert proc.returncode == 2 and str(bad) in error_line(proc) and "cannot load" in error_line(proc)
    proc = pipesd("generate", "x", "--mode", "edge_only", "--draft-model", str(tmp_path / "missing.gguf"))
    assert proc.returncode == 2 and "--draft-model" in error_line(proc)
    proc = pipesd("generate", "x", "--verifier", CLOSED, "--psk-file", str(tmp_path / "missing.key"))
    assert proc.returncode == 2 and "--psk-file" in error_line(proc) and "No such file" in error_line(proc)


def test_errors_name_cli_flags_not_python_parameters():
    proc = pipesd("generate", "x")                                     # pipesd needs a verifier
    assert proc.returncode == 2 and "--verifier" in error_line(proc) and "verifier_url" not in proc.stderr
    proc = pipesd("generate", "x", "--verifier", CLOSED, "--verifier-key", "AAAA")
    assert proc.returncode == 2 and "--verifier-key" in error_line(proc) and "verifier_key" not in proc.stderr
    proc = pipesd("generate", "x", "--mode", "cloud_only", "-k", "8", "--verifier", CLOSED, "--verifier-key", KEY)
    assert proc.returncode == 2 and "-k" in error_line(proc) and "draft_k" not in proc.stderr
    proc = pipesd("generate", "x", "--mode", "vanilla", "-k", "1000", "--verifier", CLOSED, "--verifier-key", KEY)
    assert proc.returncode == 2 and "64" in error_line(proc)            # the limit, named


def test_sampling_options_and_their_misuse():
    run = lambda *extra: pipesd("generate", "def f():", "--mode", "edge_only", "--max-new-tokens", "16",  # noqa: E731
                                "--json", *extra)
    a, b = run("--temperature", "0.9", "--seed", "7"), run("--temperature", "0.9", "--seed", "7")
    assert a.returncode == b.returncode == 0
    assert json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]      # seeded: reproducible
    texts = {tuple(json.loads(run("--temperature", "1.5", "--seed", str(s)).stdout)["tokens"]) for s in range(4)}
    assert len(texts) > 1                                                        # and the seed matters
    greedy = run("--seed", "3")
    assert greedy.returncode == 0
    assert "--temperature" in error_line(greedy)                                 # one warning line, and why


def test_chat_renders_the_models_template(tmp_path):
    proc = pipesd("generate", "Write a loop", "--mode", "edge_only", "--chat", "--max-new-tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    with EdgeClient(local_only=True, threads=1) as client:
        rendered = client.render_chat([{"role": "user", "content": "Write a loop"}])
        assert rendered == "User: Write a loop\nAssistant:"          # the embedded pair's plain template
        assert json.loads(proc.stdout)["stats"]["prompt_tokens"] == len(client.tokenize(rendered, True))
        r = client.chat([{"role": "user", "content": "Write a loop"}], max_new_tokens=8)
        assert r.tokens == json.loads(proc.stdout)["tokens"]
        assert not any(stop in r.text for stop in PLAIN_STOP)
        with pytest.raises(ConfigError, match="messages"):
            client.chat("Write a loop")                                  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="role"):
            client.chat([{"content": "x"}])


def test_api_mistakes_are_config_errors_and_greedy_seeds_warn():
    with EdgeClient(local_only=True, threads=1) as client:
        with pytest.raises(ConfigError, match="prompt"):
            client.generate(None)                                        # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="max_new_tokens"):
            client.generate("x", max_new_tokens="10")                   # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="stop"):
            client.generate("x", stop=[""])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            client.generate("x", max_new_tokens=2, seed=3)
        assert any("temperature" in str(w.message) for w in caught)


def test_edge_only_generate_prints_text_and_stats_only():
    proc = pipesd("generate", "def f():", "--mode", "edge_only", "--max-new-tokens", "8")
    assert proc.returncode == 0 and proc.stdout.strip()
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        line for line in proc.stderr.splitlines() if line.startswith("mode=edge_only")]


def test_the_public_api_type_checks_for_an_app(tmp_path):
    """mypy --strict on an app's script finds EdgeClient.generate's and chat's parameters (py.typed)."""
    pytest.importorskip("mypy")
    app = tmp_path / "app.py"
    app.write_text(
        "from edge_sdk import EdgeClient, GenerationResult\n\n\n"
        "def run(client: EdgeClient) -> str:\n"
        "    r: GenerationResult = client.generate('def f():', max_new_tokens=8, temperature=0.5, seed=1)\n"
        "    c = client.chat([{'role': 'user', 'content': 'hi'}], max_new_tokens=4, top_p=0.9)\n"
        "    bad = client.generate('x', max_new_tokenz=3)\n"
        "    worse = client.chat('hi', temperature='hot')\n"
        "    return r.text + c.text + bad.text + worse.text\n")
    assert (REPO / "edge_sdk" / "py.typed").is_file()
    proc = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-error-summary",
                           "--cache-dir", str(tmp_path / ".mypy_cache"), str(app)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MYPYPATH": str(REPO)})
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 3, proc.stdout                  # exactly the three mistakes, nothing on good lines
    assert all(f"app.py:{n}:" in e for n, e in zip((7, 8, 8), errors)), errors
    assert "max_new_tokenz" in errors[0]


def test_quiet_by_default_llama_cpp_speaks_when_asked():
    """The shipped GGUFs make llama.cpp warn on every load (n_ctx_train 0) and log rollbacks; the SDK's log
    callback drops its lines unless the app asks for them (verbose=True, `pipesd generate --verbose`)."""
    def load(verbose: bool) -> str:
        code = ("import pipesd_models; from edge_sdk import LlamaCppDrafter; "
                f"d = LlamaCppDrafter(pipesd_models.draft_path(), threads=1, verbose={verbose}); "
                "d.set_context([1, 2, 3]); d.next_token(); d.set_context([1]); d.next_token()")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    assert load(False).strip() == ""
    assert "llama" in load(True)
