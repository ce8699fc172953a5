"""The greedy acceptance rule on hand-made logits (no model)."""

import numpy as np
import pytest

from cloud_verifier.nav import greedy_accept


def logits_for(argmaxes, vocab=8):
    rows = np.zeros((len(argmaxes), vocab), dtype=np.float32)
    rows[np.arange(len(argmaxes)), argmaxes] = 1.0
    return rows


def test_all_accepted_gives_bonus_token():
    assert greedy_accept([3, 1, 4], logits_for([3, 1, 4, 5])) == (3, 5)


def test_first_mismatch_gives_correction():
    assert greedy_accept([3, 1, 4], logits_for([3, 2, 4, 5])) == (1, 2)


def test_rejection_at_first_token():
    assert greedy_accept([7, 1], logits_for([0, 1, 2])) == (0, 0)


def test_empty_draft_is_plain_decoding():
    assert greedy_accept([], logits_for([6])) == (0, 6)


def test_later_matches_after_a_mismatch_do_not_count():
    assert greedy_accept([1, 9, 3], logits_for([1, 2, 3, 4])) == (1, 2)


def test_row_count_is_checked():
    with pytest.raises(ValueError):
        greedy_accept([1, 2], logits_for([1, 2]))
