"""The quality measures of examples/eval_tiny.py that TRAINING.md reports."""

from __future__ import annotations

import pytest

et = pytest.importorskip("examples.eval_tiny")


def test_loop_measures_count_repeated_4grams_and_duplicated_lines():
    rep4, dup = et.loop_measures([1, 2, 3, 4, 1, 2, 3, 4], "x = 1\ny = 2\nx = 1\n\n")
    assert rep4 == pytest.approx(1 / 5)  # 5 four-grams, (1, 2, 3, 4) twice
    assert dup == pytest.approx(1 / 3)
    assert et.loop_measures([1, 2, 3, 4, 5], "a\nb") == (0.0, 0.0)


def test_shared_lines_sees_a_stock_line_across_texts_that_per_text_measures_miss():
    stock = "raise AssertionError(f'Expected a tensor')"
    texts = [f"def f(a):\n    {stock}", f"def g(b):\n    {stock}\n    return b + 1 if b else None", "x = compute_something(1)"]
    # text 0: its only long line is shared (1); text 1: one of two (1/2); text 2: none (0)
    assert et.shared_lines(texts) == pytest.approx((1 + 0.5 + 0) / 3)
    assert all(et.loop_measures([1, 2, 3, 4], t)[1] == 0.0 for t in texts), "no text repeats a line of its own"
    assert et.shared_lines(["short\nlines", "short\nlines"]) == 0.0, "lines under 20 characters do not count"
