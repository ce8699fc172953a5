"""The stopping-rule replay (pipesd_lab/stopping.py): rounds, costs and rules, on hand-made continuations."""

import pytest

from edge_sdk.controller import AcceptanceModel
from pipesd_lab.stopping import Continuation, Controller, evaluate, fixed_length, oracle, replay, survival_below

AGREES = [True, True, False, True, True, True, True, True, False, True]


def test_a_fixed_length_replays_every_round_and_its_pass():
    # k = 4: [T T F .] 2 accepted (14 ms, 3 tokens); [T T T T] 4 (14 ms, 5); [F T] 0 (12 ms, 1); [T] 1 (11 ms,
    # its bonus token past the continuation's end not counted: 1).
    r = replay([Continuation([0.5] * 10, AGREES)], fixed_length(4), fixed=10, per_token=1)
    assert (r.cost, r.committed, r.drafted, r.rounds) == (51, 10, 11, 4)
    assert r.row()["ms_per_token"] == pytest.approx(5.1)


def test_the_oracle_drafts_exactly_the_tokens_that_will_be_accepted():
    r = replay([Continuation([0.5] * 10, AGREES)], oracle, fixed=10, per_token=1)
    assert (r.cost, r.committed, r.drafted) == (12 + 15 + 11, 10, 2 + 5 + 1)


def test_a_survival_threshold_stops_at_the_token_that_crosses_it_sent_or_not():
    c = Continuation([0.9, 0.9, 0.3, 0.9], [True] * 4)
    raw = lambda p, n: p      # noqa: E731
    assert survival_below(0.5, raw)(c, 0, 1) == 2                       # 0.9, 0.81, then 0.243 < 0.5
    assert survival_below(0.5, raw, send_crossing=True)(c, 0, 1) == 3   # ... which the engine would send
    assert survival_below(0.1, raw)(c, 0, 1) == 4


def test_the_controller_drafts_long_where_the_draft_is_sure_and_short_where_it_is_not():
    sure, unsure = Continuation([0.99] * 40, [True] * 40), Continuation([0.05] * 40, [True] * 40)
    gpu, cpu = Controller(AcceptanceModel(), fixed=20, per_token=0.2), Controller(AcceptanceModel(), 9.6, 1.1)
    assert gpu(sure, 0, 1) > 8 and cpu(sure, 0, 1) > 8
    assert cpu(unsure, 0, 1) <= 1 < gpu(unsure, 0, 1)       # a drafted token is worth more next to a costly pass


def test_the_controller_learns_from_its_verdicts():
    c = Continuation([0.6] * 60, [False] * 60)                  # every draft rejected
    rule = Controller(AcceptanceModel(), fixed=9.6, per_token=1.1)
    first = rule(c, 0, 1)
    r = replay([c], rule, fixed=9.6, per_token=1.1)
    assert first >= 1 and r.drafted / r.rounds < first          # it learnt to draft less (or nothing)


def test_the_report_scores_every_rule_against_vanillas_k4():
    continuations = [Continuation([0.9 if a else 0.2 for a in AGREES * 3], AGREES * 3)] * 4
    rows = evaluate(continuations, {"cpu": (9.6, 1.1)})["cpu"]["rows"]
    by_rule = {r["rule"]: r for r in rows}
    oracle_row = by_rule["oracle (stops before the first rejection)"]
    assert oracle_row["vs_k4"] < 0 and all(oracle_row["ms_per_token"] <= r["ms_per_token"] + 1e-9 for r in rows)
    assert by_rule["fixed k = 2"]["vs_k4"] != 0 and by_rule["the round controller (pipesd_no_proactive, objective cloud_cost)"]
    assert sum("survival >=" in r for r in by_rule) == 3
