"""Chaos: kill the verifier process at random points across generations and restart it.

12 kills in `make test`; `PIPESD_CHAOS_KILLS=50` is the soak run that docs/offline.md reports.
A real verifier process (llama.cpp target: it restarts in well under a second, so the restarts fit
in CI), a real edge, mixed policies, a seeded schedule, bounded in count and time. Every
generation must complete; no token may be lost or duplicated (the stream and the result agree,
and each generation has its full length unless it met EOS); the verified part (everything before
the first unverified token) must equal the target's greedy output; after the chaos, collaboration
must be back (a clean generation equals target greedy). The time from each restart to the first
verified token after it is printed (run with -s to see it) and summarised in docs/offline.md.
"""

import os
import random
import statistics
import threading
import time

import pytest

import pipesd_models
from cloud_verifier import LocalVerifier
from edge_sdk import EdgeClient, LlamaCppDrafter
from pipesd_lab.emulation import SlowedDrafter

from .conftest import PROMPTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KILLS = int(os.environ.get("PIPESD_CHAOS_KILLS", "12"))
MAX_NEW = 48
MODES = ("pipesd", "vanilla", "cloud_only", "hsl", "pipesd_per_token")


@pytest.fixture(scope="module")
def chaos_verifier():
    with LocalVerifier(model="embedded", backend="llamacpp", threads=1) as v:
        yield v


def test_kill_the_verifier_repeatedly(chaos_verifier):
    v = chaos_verifier
    with EdgeClient(v.url, verifier_key=v.public_key, threads=1) as ref_client:
        reference = {p: ref_client.generate(p, max_new_tokens=MAX_NEW, mode="cloud_only").tokens for p in PROMPTS}
    rng = random.Random(2026)
    ready_at: list[float] = []
    killed_at: list[float] = []
    chaos_done = threading.Event()

    def chaos():
        try:
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.05, 1.5))      # a random point in some generation
                killed_at.append(time.perf_counter())
                v.kill()
                time.sleep(rng.uniform(0.0, 0.2))
                v.restart()
                ready_at.append(time.perf_counter())
        finally:
            chaos_done.set()

    drafter = SlowedDrafter(LlamaCppDrafter(pipesd_models.draft_path(), threads=1), 0.003)
    generations = []
    with EdgeClient(v.url, verifier_key=v.public_key, drafter=drafter, nav_deadline_s=1.0) as edge:
        thread = threading.Thread(target=chaos, daemon=True)
        thread.start()
        give_up = time.monotonic() + 600
        i = 0
        def chaos_running():   # and 1.5 s after the last restart, to see collaboration come back
            return not chaos_done.is_set() or (ready_at and time.perf_counter() < ready_at[-1] + 1.5)

        while chaos_running() and time.monotonic() < give_up:
            prompt, mode = PROMPTS[i % len(PROMPTS)], MODES[i % len(MODES)]
            i += 1
            gen = edge.stream(prompt, max_new_tokens=MAX_NEW, mode=mode)
            stamped = [(time.perf_counter(), e) for e in gen]
            generations.append((prompt, mode, stamped, gen.result))
        thread.join(60)
        assert chaos_done.is_set() and len(ready_at) == KILLS, "the chaos schedule did not finish"
        # Collaboration is back: a clean generation equals target greedy, every token verified.
        time.sleep(0.5)
        for _ in range(20):
            clean = edge.generate(PROMPTS[0], max_new_tokens=MAX_NEW, mode="pipesd")
            if not edge.is_offline and all(e.verified for e in clean.events if e.token is not None):
                break
        assert clean.tokens == reference[PROMPTS[0]]

    offline_generations = 0
    for prompt, mode, stamped, result in generations:
        events = [e for _, e in stamped if e.token is not None]
        tokens = [e.token for e in events]
        assert tokens == result.tokens, "the stream and the result disagree (a token lost or duplicated)"
        assert len(tokens) == MAX_NEW or tokens[-1] in edge.drafter.eos_token_ids
        verified = []
        for e in events:
            if not e.verified:
                break
            verified.append(e.token)
        assert verified == reference[prompt][: len(verified)], f"{mode}: verified tokens differ from target greedy"
        offline_generations += len(verified) < len(tokens)
    assert offline_generations >= KILLS // 5, "the kills should have sent generations offline"

    # Resume time: from each restart to the first verified token after it, when one came before the
    # next kill (a kill soon after a restart leaves no window to measure).
    verified_times = sorted(t for _, _, stamped, _ in generations for t, e in stamped if e.token is not None
                            and e.verified)
    resumes, windows = [], 0
    for ready, next_kill in zip(ready_at, killed_at[1:] + [float("inf")]):
        after = next((t for t in verified_times if t >= ready), None)
        if next_kill - ready > 1.0:
            windows += 1
            assert after is not None and after < next_kill, "collaboration did not resume within a 1 s+ window"
        if after is not None and after < next_kill:
            resumes.append(after - ready)
    assert windows >= KILLS // 5 and len(resumes) >= windows
    resumes.sort()
    print(f"\nchaos: {KILLS} kills over {len(generations)} generations ({offline_generations} had an offline "
          f"stretch); restart -> first verified token ({len(resumes)} measured): median "
          f"{statistics.median(resumes) * 1e3:.0f} ms, p90 {resumes[int(0.9 * len(resumes))] * 1e3:.0f} ms, "
          f"max {resumes[-1] * 1e3:.0f} ms")
