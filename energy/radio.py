"""The radio's energy from what crossed it: a throughput-and-tail model with published parameters.

No counter on a laptop or phone isolates the radio, so the edge's radio energy is modelled (and
labelled so) from the transfers a run made. The model is the one of Huang et al., "A Close Examination
of Performance and Power Characteristics of 4G LTE Networks", MobiSys 2012 (Tables 3 and 4), which fits
smartphone measurements on LTE and Wi-Fi:

- while transferring, power = ``alpha_up`` × uplink Mbps + ``alpha_down`` × downlink Mbps + ``beta``;
  so a transfer of M megabits at any rate costs ``alpha`` × M plus ``beta`` × its duration;
- after the last transfer the radio stays in a high-power **tail** state for ``tail_s`` at ``tail_w``
  (LTE: 11.6 s of RRC_CONNECTED/DRX; Wi-Fi: a quarter of a second) before it drops to idle;
- leaving idle costs a **promotion** (``promotion_s`` at ``promotion_w``).

A measured run is one user request: the radio is idle before it (one promotion) and pays one full tail
after its last transfer. Gaps shorter than the tail are charged at tail power (the radio never slept).
Promotion delay is charged as energy only; the link emulator does not add it as latency.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RadioModel:
    name: str
    alpha_up: float        # W per Mbps of uplink throughput while sending
    alpha_down: float      # W per Mbps of downlink throughput while receiving
    beta: float            # W base power while transferring
    tail_s: float
    tail_w: float
    promotion_s: float
    promotion_w: float
    source: str = "Huang et al., MobiSys 2012, Tables 3-4"


RADIOS: dict[str, RadioModel] = {r.name: r for r in (
    RadioModel("wifi", 0.28317, 0.13701, 0.13286, 0.2381, 0.1193, 0.0791, 0.1244),
    RadioModel("lte", 0.43839, 0.05197, 1.28804, 11.576, 1.0600, 0.2601, 1.2107),
)}


@dataclass(frozen=True)
class Transfer:
    """Bytes on the air in one direction between `start` and `end` (seconds, any common clock)."""

    start: float
    end: float
    direction: str        # "up" or "down"
    nbytes: int


@dataclass(frozen=True)
class RadioEnergy:
    up: float             # J: alpha_up × Mb up + beta × time sending
    down: float           # J: alpha_down × Mb down + beta × time receiving only
    tail: float           # J: tail power between and after transfers, and promotions out of idle
    active_s: float       # seconds with something on the air
    promotions: int

    @property
    def total(self) -> float:
        return self.up + self.down + self.tail


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two unions of intervals."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def radio_energy(transfers: list[Transfer], model: RadioModel | str = "wifi") -> RadioEnergy:
    """Energy of one run's transfers under `model` (see the module docstring for the rules)."""
    model = RADIOS[model] if isinstance(model, str) else model
    for t in transfers:
        if t.end < t.start or t.nbytes < 0 or t.direction not in ("up", "down"):
            raise ValueError(f"bad transfer {t}")
    if not transfers:
        return RadioEnergy(0.0, 0.0, 0.0, 0.0, 0)
    ups = _union([(t.start, t.end) for t in transfers if t.direction == "up"])
    downs = _union([(t.start, t.end) for t in transfers if t.direction == "down"])
    active = _union(ups + downs)
    mbits_up = sum(t.nbytes for t in transfers if t.direction == "up") * 8 / 1e6
    mbits_down = sum(t.nbytes for t in transfers if t.direction == "down") * 8 / 1e6
    up_s = _length(ups)
    down_only_s = _length(downs) - _overlap(ups, downs)
    tail, promotions = model.tail_s * model.tail_w, 1          # the final tail; the first promotion
    for (_, prev_end), (nxt_start, _) in zip(active, active[1:]):
        gap = nxt_start - prev_end
        tail += min(gap, model.tail_s) * model.tail_w
        if gap > model.tail_s:
            promotions += 1
    tail += promotions * model.promotion_s * model.promotion_w
    return RadioEnergy(up=model.alpha_up * mbits_up + model.beta * up_s,
                       down=model.alpha_down * mbits_down + model.beta * down_only_s,
                       tail=tail, active_s=_length(active), promotions=promotions)
