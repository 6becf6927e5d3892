"""Phantom-truth grounding metric: hand-computed abnormal macro-F1 over findings with enough positives."""

from __future__ import annotations

import pytest

from echocxr.data.observations import Finding
from echocxr.errors import UserError
from echocxr.eval.bootstrap import bootstrap_ci
from echocxr.eval.metrics import compute, compute_all, labels

# A fixed labeling of a few report texts, so the arithmetic is checked apart from the labeler.
TABLE = {
    "normal": (("no_finding", "positive"),),
    "cardio": (("cardiomegaly", "positive"),),
    "effusion": (("pleural_effusion", "positive"),),
    "both": (("cardiomegaly", "positive"), ("pleural_effusion", "positive")),
    "maybe effusion": (("pleural_effusion", "uncertain"),),
}


def _truth(*observations: str) -> dict:
    return {o: Finding(o) for o in observations}


@pytest.fixture
def fixed_labels(monkeypatch):
    monkeypatch.setattr(labels, "_labels", TABLE.__getitem__)


def _set():
    # 12 studies: cardiomegaly in 10 (>= 10), effusion in 6 (>= 5 only), 2 normal.
    truth = [_truth("cardiomegaly")] * 4 + [_truth("cardiomegaly", "pleural_effusion")] * 6 + [{}] * 2
    perfect = ["cardio"] * 4 + ["both"] * 6 + ["normal"] * 2
    return truth, perfect


def test_constant_normal_report_scores_zero(fixed_labels):
    truth, _ = _set()
    agg = labels.phantom_grounding(["normal"] * len(truth), [""] * len(truth), truth=truth).aggregate
    assert agg["phantom_abn_macro_f1@5"] == 0.0 and agg["phantom_abn_macro_f1@10"] == 0.0
    # ... while the headline micro F1 of phantom_f1, which counts no_finding, does not.
    micro = labels.phantom_f1(["normal"] * len(truth), [""] * len(truth), truth=truth).aggregate
    assert micro["phantom_f1_micro"] == pytest.approx(2 * 2 / (2 * 2 + 10 + 16))


def test_perfect_reader_scores_one_and_minimum_excludes(fixed_labels):
    truth, perfect = _set()
    agg = labels.phantom_grounding(perfect, [""] * len(truth), truth=truth).aggregate
    assert agg["phantom_abn_macro_f1@5"] == 1.0 and agg["phantom_abn_macro_f1@10"] == 1.0
    assert agg["phantom_abn_findings@5"] == 2 and agg["phantom_abn_findings@10"] == 1
    assert agg["phantom_abn_positives/pleural_effusion"] == 6
    assert "phantom_abn_f1/no_finding" not in agg


def test_per_finding_values_by_hand(fixed_labels):
    truth, _ = _set()
    # cardiomegaly studies 0-3 read "effusion"; 4-9 (cardio + effusion) read "cardio";
    # normal 10 reads "cardio", normal 11 reads "maybe effusion" (uncertain = absent).
    hyps = ["effusion"] * 4 + ["cardio"] * 6 + ["cardio", "maybe effusion"]
    result = labels.phantom_grounding(hyps, [""] * 12, truth=truth)
    agg = result.aggregate
    # cardiomegaly: tp 6, fp 1, fn 4 -> 12/17; effusion: tp 0, fp 4, fn 6 -> 0
    assert agg["phantom_abn_f1/cardiomegaly"] == pytest.approx(12 / 17)
    assert agg["phantom_abn_f1/pleural_effusion"] == 0.0
    assert agg["phantom_abn_macro_f1@10"] == pytest.approx(12 / 17)  # effusion (6 positives) left out
    assert agg["phantom_abn_macro_f1@5"] == pytest.approx((12 / 17 + 0) / 2)
    assert result.per_sample[0] == {"phantom_abn_tp": 0.0, "phantom_abn_fp": 1.0, "phantom_abn_fn": 1.0}
    assert result.per_sample[11] == {"phantom_abn_tp": 0.0, "phantom_abn_fp": 0.0, "phantom_abn_fn": 0.0}
    # A finding stated but never drawn adds no macro term: min_positives=1 keeps the same two.
    one = labels.phantom_grounding(hyps, [""] * 12, truth=truth, min_positives=(1,)).aggregate
    assert one["phantom_abn_macro_f1@1"] == pytest.approx(agg["phantom_abn_macro_f1@5"])
    cis = bootstrap_ci(result, n_resamples=200, seed=0)
    lo, hi = cis["phantom_abn_macro_f1@10"].lo, cis["phantom_abn_macro_f1@10"].hi
    assert lo <= agg["phantom_abn_macro_f1@10"] <= hi and lo < hi
    assert "phantom_abn_findings@10" not in cis  # a count, not a score
    with pytest.raises(UserError, match="min_positives"):
        labels.phantom_grounding(hyps, [""] * 12, truth=truth, min_positives=(0,))


def test_grounding_with_the_project_labeler():
    pytest.importorskip("echocxr.data.labeler")
    sick = "Findings: The heart is enlarged. Large right pleural effusion.\nImpression: Cardiomegaly and effusion."
    normal = (
        "Findings: The lungs are clear. Heart size is normal.\nImpression: No acute cardiopulmonary disease."
    )
    truth = [_truth("cardiomegaly", "pleural_effusion")] * 5 + [{}] * 3
    refs = [sick] * 5 + [normal] * 3
    out = compute_all(["phantom_grounding"], refs, refs, truth=truth, bootstrap=20)
    assert out["phantom_abn_macro_f1@5"]["value"] == 1.0
    assert out["phantom_abn_findings@10"]["value"] == 0.0 and out["phantom_abn_macro_f1@10"]["value"] == 0.0
    constant = compute("phantom_grounding", [normal] * 8, refs, truth=truth)
    assert constant.aggregate["phantom_abn_macro_f1@5"] == 0.0
    assert (
        compute("phantom_grounding", refs, refs, truth=truth, min_positives=(3,)).aggregate[
            "phantom_abn_macro_f1@3"
        ]
        == 1.0
    )
