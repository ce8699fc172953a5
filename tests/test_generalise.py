"""pipesd grid and pipesd steps: the grid covers what it claims, the step response is read right, and a
one-point grid runs end to end with every output equal to the target's."""

from __future__ import annotations

import pytest

from pipesd_lab.generalise import (GRID_METHODS, GridConfig, GridPoint, _step_response, grid_markdown, grid_points,
                                   run_grid)


def test_the_grid_spans_the_links_and_devices_it_names():
    points = grid_points()
    assert len(points) >= 24 and len({p.name for p in points}) == len(points)
    assert {p.rtt_ms for p in points} == {10.0, 40.0, 150.0}
    assert {p.payload for p in points} == {"ids", "paper"}
    assert min(p.up_mbps for p in points) == 1.0 and max(p.up_mbps for p in points) == 100.0
    assert None in {p.draft_ms for p in points} and max(p.draft_ms or 0 for p in points) == 40.0
    link = GridPoint(40.0, 5.0, "paper", 100.0).link(2048, seed=0)
    assert link.payload_bytes_per_token == 290_000 and link.jitter_ms == 2.0 and link.rtt_ms == 40.0


def test_the_step_response_counts_rounds_until_the_running_median_settles():
    plan = {"plan_head": 2, "ahead": 2, "ahead_draft": 8, "beta_ms": 1.0}
    rounds = [{"t": i * 0.1, "up_mbps": 80.0, "drafted": 8, **plan} for i in range(40)]
    rounds += [{"t": 4 + i * 0.1, "up_mbps": 10.0, "drafted": d, **plan, "beta_ms": b}
               for i, (d, b) in enumerate(zip([8, 8, 6, 2] + [2] * 60, [1.0, 1.0, 6.0] + [6.5] * 61))]
    (step,) = _step_response(rounds, payload_bytes=8192)
    assert (step["from_mbps"], step["to_mbps"], step["before"], step["after"]) == (80.0, 10.0, 8, 2)
    assert step["rounds_to_settle"] == 1      # rounds 1..5 after the step have a median of 2
    assert step["true_beta_ms"] == pytest.approx(6.55, abs=0.01) and step["rounds_to_price"] == 2
    assert step["plan_before"] == step["plan_after"] == (2, 2, 8)


@pytest.mark.integration
def test_a_one_point_grid_runs_end_to_end_losslessly():
    cfg = GridConfig(tokens=16, tokens_per_prompt=16, pin=False, progress=False,
                     points=[GridPoint(20.0, None, "ids", 10.0)])
    rows = run_grid(cfg)
    (row,) = rows
    assert set(row["tpt_ms"]) == set(GRID_METHODS) and all(v > 0 for v in row["tpt_ms"].values())
    assert all(v == 0 for v in row["mismatches"].values())
    assert row["speedup"] > 0 and "| rtt20/draft native/ids@10Mbps |" in grid_markdown(rows, "pipesd grid", cfg)


def test_the_rounds_report_groups_the_gaps_between_verdicts_by_what_came_before():
    from edge_sdk.stats import RoundRecord
    from pipesd_lab.rounds import transitions

    def rec(kind, drafted, accepted, sent, answered):
        return RoundRecord(kind, drafted, accepted, sent, answered, answered + 0.001, 10.0, 1.0)

    generation = [rec("plain", 3, 1, 0.00, 0.04),        # rejected ...
                  rec("rebased", 0, 0, 0.01, 0.05),      # ... answered rebased 10 ms later
                  rec("plain", 2, 2, 0.05, 0.09),        # a head sent after that answer: 40 ms
                  rec("pipelined", 4, 1, 0.06, 0.10),    # the round ahead of it: 10 ms
                  rec("rebased", 0, 0, 0.07, 0.11)]      # 10 ms
    rows = {(r["before"], r["this"]): r for r in transitions([generation])}
    assert set(rows) == {("plain, rejected", "rebased, empty"), ("rebased, empty", "plain, drafted"),
                         ("plain, all accepted", "pipelined, drafted"), ("pipelined, rejected", "rebased, empty")}
    head = rows[("rebased, empty", "plain, drafted")]
    assert head["n"] == 1 and head["gap_ms"] == pytest.approx(40.0) and head["share"] == pytest.approx(40 / 70)
    assert head["nav_ms"] == pytest.approx(40.0) and head["late_ms"] == pytest.approx(1.0)
    assert head["committed"] == 3
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)
