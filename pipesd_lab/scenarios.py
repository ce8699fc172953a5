"""The paper's four scenarios (docs/design.md §4), in two regimes, as link profiles and device speeds.

S1 laptop edge, S2 2.5 GHz phone, S3 1.2 GHz IoT board: 20 Mbps up / 200 Mbps down. S4 the
laptop on a dynamic network (uplink 10-80 Mbps, downlink 150-280 Mbps, a new value every 20 s).

RTT: 20 ms for every scenario, a device on Wi-Fi talking to a cloud region in the same part of the
world (the paper gives bandwidths, not its RTT; 20 ms keeps latency from hiding the upload cost the
paper is about).

Device speed: the paper emulated S2 and S3 by adding time per drafted token. We scale the laptop's
draft time by the clock ratio against a laptop that boosts to ~4 GHz: S2 ×1.6 (4/2.5), S3 ×3.3
(4/1.2). Per-token draft time is close to inversely proportional to clock for a small model that
fits in cache; memory bandwidth and core width would make the phone and the board slower still, so
these are optimistic for the device.

Regimes:
* ``paper``: the paper's laptop drafted at γ ≈ 36 ms/token and uploaded its draft's full
  32k-vocabulary float distribution per token (~0.29 MB). We add time per drafted token to reach
  γ = 36 ms × slowdown and pad each drafted token's upload to 290,000 bytes. Acceptance comes from
  our real models.
* ``native``: our real draft speed (× slowdown for S2/S3) and our real payloads: ``ids`` (token ids
  only, what greedy sends), ``topk`` (sparse top-8 ids + float16 probabilities, 48 B/token: what
  sampling would send), ``full`` (the draft's whole vocabulary as float32: 8,192 B/token for our 2048 tokens).
* ``device``: a realistic deployment. A phone-class draft (25 ms per token on the S1 device, × the
  S2/S3 slow-downs: a ~1B draft on a phone CPU), token-id payload, RTT 50 ms with ±10 ms jitter
  (each one-way delay uniform in ±5 ms), and a target whose every pass takes 20 ms + 0.2 ms per
  token (a 7B model on a datacenter GPU, emulated by the verifier's ``--emulate-pass-ms 20,0.2``:
  see ``DEVICE_PASS_MS``). The bandwidths are the scenario's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .emulation import BandwidthTrace, LinkProfile

PAPER_GAMMA_S = 0.036
PAPER_PAYLOAD_BYTES = 290_000
RTT_MS = 20.0
PAYLOADS = ("ids", "topk", "full")
DEVICE_GAMMA_S = 0.025
DEVICE_RTT_MS, DEVICE_JITTER_MS = 50.0, 5.0     # ±5 ms per direction: ±10 ms on the round trip
DEVICE_PASS_MS = (20.0, 0.2)                    # the verifier's emulated target pass: fixed, per token
DEVICE_VERIFIER_ARGS = ("--emulate-pass-ms", ",".join(f"{x:g}" for x in DEVICE_PASS_MS))   # its verifier's flags


def payload_bytes(payload: str, vocab_size: int) -> int:
    """Extra uplink bytes per drafted token of a native payload mode."""
    return {"ids": 0, "topk": 8 * (4 + 2), "full": vocab_size * 4}[payload]
REGIMES = ("paper", "native", "device")


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    up_mbps: float = 20.0
    down_mbps: float = 200.0
    slowdown: float = 1.0            # device draft time relative to the laptop
    dynamic: bool = False            # S4: bandwidth follows a seeded trace

    def link(self, regime: str, payload: str = "ids", seed: int = 0, rtt_ms: float = RTT_MS,
             up_mbps: float | None = None, vocab_size: int = 2048) -> LinkProfile:
        """The link of this scenario in `regime` (`payload` applies to the native regime only)."""
        if regime not in REGIMES:
            raise ValueError(f"regime must be one of {REGIMES}, not {regime!r}")
        if payload not in PAYLOADS:
            raise ValueError(f"payload must be one of {PAYLOADS}, not {payload!r}")
        extra = PAPER_PAYLOAD_BYTES if regime == "paper" else payload_bytes(payload, vocab_size)
        jitter = 0.0
        if regime == "device":
            extra, rtt_ms, jitter = 0, DEVICE_RTT_MS, DEVICE_JITTER_MS
        trace = BandwidthTrace.generated(seed) if self.dynamic else None
        return LinkProfile(up_mbps if up_mbps is not None else self.up_mbps, self.down_mbps, rtt_ms, extra,
                           jitter_ms=jitter, trace=trace, seed=seed)

    def added_draft_seconds(self, regime: str, measured_gamma_s: float) -> float:
        """Time to add per drafted token so the device drafts as this scenario's does."""
        base = {"paper": PAPER_GAMMA_S, "device": DEVICE_GAMMA_S}.get(regime, measured_gamma_s)
        target = base * self.slowdown
        return max(0.0, target - measured_gamma_s)

    def with_uplink(self, up_mbps: float) -> "Scenario":
        return replace(self, name=f"{self.name}@{up_mbps:g}Mbps", up_mbps=up_mbps, dynamic=False)


SCENARIOS: dict[str, Scenario] = {
    "s1": Scenario("s1", "laptop edge, 20/200 Mbps"),
    "s2": Scenario("s2", "2.5 GHz phone (draft ×1.6), 20/200 Mbps", slowdown=1.6),
    "s3": Scenario("s3", "1.2 GHz IoT board (draft ×3.3), 20/200 Mbps", slowdown=3.3),
    "s4": Scenario("s4", "laptop, dynamic network: up 10-80, down 150-280 Mbps, every 20 s", dynamic=True),
}


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}") from None
