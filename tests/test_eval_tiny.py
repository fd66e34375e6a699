"""The quality measures of examples/eval_tiny.py that TRAINING.md reports."""

from __future__ import annotations

import pytest

et = pytest.importorskip("examples.eval_tiny")


def test_loop_measures_count_repeated_4grams_and_duplicated_lines():
    rep4, dup = et.loop_measures([1, 2, 3, 4, 1, 2, 3, 4], "x = 1\ny = 2\nx = 1\n\n")
    assert rep4 == pytest.approx(1 / 5)  # 5 four-grams, (1, 2, 3, 4) twice
    assert dup == pytest.approx(1 / 3)
    assert et.loop_measures([1, 2, 3, 4, 5], "a\nb") == (0.0, 0.0)


def test_shared_ngrams_sees_a_stock_phrase_across_prompts_that_per_text_measures_miss():
    stock = [7, 8, 9, 10]
    seqs = [[1, *stock], [2, *stock, 3], [4, 5, 6, 11, 12]]
    # n=4: seq 0 has 2 grams, (7..10) shared -> 1/2; seq 1 has 3, one shared -> 1/3; seq 2 none -> 0
    assert et.shared_ngrams(seqs, 4) == pytest.approx((1 / 2 + 1 / 3 + 0) / 3)
    assert all(et.loop_measures(s, "")[0] == 0.0 for s in seqs), "no sequence repeats a 4-gram of its own"
    assert et.shared_ngrams([[1, 2, 3], [1, 2, 3]], 4) == 0.0, "sequences shorter than n hold no n-gram"
