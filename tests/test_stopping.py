"""The stopping-rule replay (pipesd_lab/stopping.py): rounds, costs and rules, on hand-made continuations."""

import pytest

from edge_sdk.controller import AcceptanceModel
from pipesd_lab.stopping import Continuation, controller, evaluate, fixed_length, oracle, replay, survival_below

AGREES = [True, True, False, True, True, True, True, True, False, True]


def test_a_fixed_length_replays_every_round_and_its_pass():
    # k = 4: [T T F .] 2 accepted (14 ms, 3 tokens); [T T T T] 4 (14 ms, 5); [F T] 0 (12 ms, 1); [T] 1 (11 ms, 2).
    r = replay([Continuation([0.5] * 10, AGREES)], fixed_length(4), fixed=10, per_token=1)
    assert r["ms_per_token"] == pytest.approx(51 / 11)
    assert r["committed_per_round"] == pytest.approx(11 / 4) and r["drafted_per_round"] == pytest.approx(11 / 4)


def test_the_oracle_drafts_exactly_the_tokens_that_will_be_accepted():
    r = replay([Continuation([0.5] * 10, AGREES)], oracle, fixed=10, per_token=1)
    assert r["ms_per_token"] == pytest.approx((12 + 15 + 11) / 11)


def test_a_survival_threshold_keeps_a_token_only_while_the_survival_with_it_holds():
    c = Continuation([0.9, 0.9, 0.3, 0.9], [True] * 4)
    assert survival_below(0.5, lambda p, n: p)(c, 0, 1) == 2        # 0.9, 0.81, then 0.243 < 0.5
    assert survival_below(0.1, lambda p, n: p)(c, 0, 1) == 4


def test_the_controller_drafts_long_where_the_draft_is_sure_and_short_where_it_is_not():
    sure, unsure = Continuation([0.99] * 40, [True] * 40), Continuation([0.05] * 40, [True] * 40)
    gpu, cpu = controller(AcceptanceModel(), fixed=20, per_token=0.2), controller(AcceptanceModel(), 9.6, 1.1)
    assert gpu(sure, 0, 1) > 8 and cpu(sure, 0, 1) > 8
    assert cpu(unsure, 0, 1) <= 1 < gpu(unsure, 0, 1)       # a drafted token is worth more next to a costly pass


def test_the_report_scores_every_rule_against_vanillas_k4():
    continuations = [Continuation([0.9 if a else 0.2 for a in AGREES], AGREES)] * 4
    rows = evaluate(continuations, {"cpu": (9.6, 1.1)})["cpu"]["rows"]
    by_rule = {r["rule"]: r for r in rows}
    assert by_rule["fixed k = 4"]["vs_k4"] == 0.0
    assert by_rule["oracle (stops before the first rejection)"]["vs_k4"] < 0
    assert len(rows) == 8 + 1 + 3
