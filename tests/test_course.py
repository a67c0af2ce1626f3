"""course.py: lesson 7's three loss mistakes against independent computations; the quick lessons run."""

import math

import pytest

import course


def test_the_three_loss_mistakes_show_what_they_change():
    f = course.loss_mistakes()
    # (a) against the sampler the ratio is exactly 1, so nothing is clipped; against the reference it is not
    assert f["clip_old"] == 0 and f["clip_ref"] > 0.05 and f["cosine_ref"] < 0.999
    # (b) shifted log-probs are those sampling drew from (recomputed one step at a time); unshifted are not
    assert f["shift_error"] < 1e-10 and abs(f["logp_unshifted"] - f["logp_sampling"]) > 0.05
    # (c) the population std inflates advantages by sqrt(G / (G - 1)), the closed form
    for G, factor in f["std_inflation"].items():
        assert factor == pytest.approx(math.sqrt(G / (G - 1)), rel=1e-5)


@pytest.mark.parametrize("number", [4, 6, 7])
def test_quick_lessons_run_and_print(number, capsys):
    course.LESSONS[number]()
    out = capsys.readouterr().out
    assert {4: "advantage", 6: "quiz + length penalty", 7: "Bessel"}[number] in out
