"""The search's recipe header judges a top-1 gain with the model card's own rule (issue 21)."""

from laser_export.export.card import format_gain_assessment
from laser_export.search.recipe_writer import header_comments


def _test(top1, no_article, no_article_ci):
    return {
        "n": 300,
        "baseline": {"top1": 0.30, "top1_no_article": 0.40},
        "reduced": {"top1": 0.30 + top1, "top1_no_article": 0.40 + no_article},
        "delta_top1_bootstrap": {"estimate": top1, "ci95": [top1 - 0.03, top1 + 0.03], "n": 300},
        "delta_top1_no_article_bootstrap": {"estimate": no_article, "ci95": no_article_ci, "n": 300},
    }


def _header(test):
    return "\n".join(header_comments(source="m", benchmark="b", n_validation=100, n_candidates=4, layers=[0, 1],
                                     matrices=["fc_in"], rhos=[0.1], compose=1, test=test, tolerance=0.01))


def test_gain_mostly_format_is_not_called_recall():
    """The trial's case: top-1 +7.67 pts, article-excluded +2.50 pts with a CI above 0. The header said
    "a recall gain" while the card, for the same numbers, said part of the gain is answer format."""
    test = _test(0.0767, 0.0250, [0.005, 0.045])
    text = _header(test)
    assert "a recall gain" not in text
    assert "part of the top1 gain is answer format, not recall (article-excluded top1 moves 33% as much)" in text
    flag, _ = format_gain_assessment({"top1": test["delta_top1_bootstrap"],
                                      "top1_no_article": test["delta_top1_no_article_bootstrap"]})
    assert flag  # the card flags the same numbers


def test_gain_that_is_recall_is_called_recall():
    text = _header(_test(0.05, 0.045, [0.02, 0.07]))
    assert "a recall gain" in text and "answer format" not in text


def test_loss_is_called_a_loss():
    text = _header(_test(-0.05, -0.05, [-0.08, -0.02]))
    assert "a recall loss" in text
