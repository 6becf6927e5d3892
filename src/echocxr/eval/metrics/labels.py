"""Clinical label F1 from the project's rule-based labelers (`echocxr.data.labeler.label_report`;
Chinese sentences through `echocxr.data.labeler_zh.label_report_zh`).

An observation counts as present in a report when the labeler marks it positive (variant
`_upos`: positive or uncertain); negative, uncertain and unmentioned count as absent. Micro F1
pools true/false positives over all observations and studies; macro F1 averages per-observation
F1 over the observations that occur at all (in a reference or a prediction), since F1 is
undefined for one that occurs nowhere. Scopes: all observations (CheXpert-14 + extras) and
CheXpert-14 only.

`phantom_f1` scores generated reports against the findings each phantom radiograph was
rendered with (its positive entries), which is exact ground truth for what the image shows.
Its micro F1 counts `no_finding` hits, so a constant normal report scores well on a mostly
normal set. `phantom_grounding` is the honest grounding number: macro F1 over the abnormal
findings only (`no_finding` left out), each finding with enough positives in the eval set.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from echocxr.data.observations import CHEXPERT14, OBSERVATIONS, Finding
from echocxr.errors import UserError
from echocxr.eval.metrics import MetricResult

_C14 = np.array([o in CHEXPERT14 for o in OBSERVATIONS])


@functools.lru_cache(maxsize=65536)
def _labels(text: str) -> tuple[tuple[str, str], ...]:
    # Reference reports are labeled once per process although several metrics read them. Chinese
    # scoring hands these functions `zh_to_en` output: the renderer's sentences in English, any
    # other Chinese sentence kept as it was, which the Chinese labeler reads (`label_text`).
    from echocxr.data.labeler_zh import label_text

    return tuple(sorted((obs, f.status) for obs, f in label_text(text).items()))


def present(labels: Sequence[tuple[str, str]], uncertain_positive: bool = False) -> np.ndarray:
    """[K] bool over OBSERVATIONS: which observations the labels state as present."""
    yes = {"positive", "uncertain"} if uncertain_positive else {"positive"}
    found = {obs for obs, status in labels if status in yes}
    return np.array([o in found for o in OBSERVATIONS])


def confusion(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """[N, K] bool predictions and truths -> [N, K, 3] counts (tp, fp, fn)."""
    return np.stack([pred & true, pred & ~true, ~pred & true], axis=-1).astype(np.int64)


def f1_scores(counts: np.ndarray, scope: np.ndarray | None = None) -> tuple[float, float, dict[str, float]]:
    """Summed [K, 3] counts -> (micro F1, macro F1, per-observation F1 of the observations that occur)."""
    keep = np.ones(len(OBSERVATIONS), bool) if scope is None else scope
    c = counts[keep]
    tp, fp, fn = c.sum(axis=0)
    micro = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    per = {}
    for obs, (t, p, n) in zip(np.array(OBSERVATIONS)[keep], c):
        if t + p + n:
            per[str(obs)] = 2 * t / (2 * t + p + n)
    macro = float(np.mean(list(per.values()))) if per else 0.0
    return float(micro), macro, {k: float(v) for k, v in per.items()}


def _sample_f1(counts: np.ndarray) -> list[dict[str, float]]:
    out = []
    for tp, fp, fn in counts.sum(axis=1):
        # A report that states nothing present, for a study with nothing present, is right.
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
        out.append({"sample_f1": float(f1), "tp": float(tp), "fp": float(fp), "fn": float(fn)})
    return out


def _result(prefix: str, counts: np.ndarray, per_observation: bool, note: str) -> MetricResult:
    def aggregate(c: np.ndarray) -> dict[str, float]:
        total = c.sum(axis=0)  # [K, 3]
        micro, macro, per = f1_scores(total)
        micro14, macro14, _ = f1_scores(total, _C14)
        out = {
            f"{prefix}_micro": micro,
            f"{prefix}_macro": macro,
            f"{prefix}_micro_chexpert14": micro14,
            f"{prefix}_macro_chexpert14": macro14,
        }
        if per_observation:
            out.update({f"{prefix}/{obs}": v for obs, v in per.items()})
        return out

    per_sample = [{f"{prefix}_{k}": v for k, v in d.items()} for d in _sample_f1(counts)]
    # Observations absent from a resample drop out of its per-observation F1; report only the
    # keys of the full set and let a missing one count as undefined (nan) in that resample.
    full = aggregate(counts)
    return MetricResult(
        full,
        per_sample,
        note,
        lambda idx: {k: aggregate(counts[idx]).get(k, float("nan")) for k in full},
    )


def _label_f1(hyps: list[str], refs: list[str], uncertain_positive: bool, prefix: str) -> MetricResult:
    pred = np.stack([present(_labels(h), uncertain_positive) for h in hyps])
    true = np.stack([present(_labels(r), uncertain_positive) for r in refs])
    rule = "positive or uncertain" if uncertain_positive else "positive (uncertain counts as absent)"
    return _result(prefix, confusion(pred, true), False, f"labels: echocxr.data.labeler, present = {rule}")


def label_f1(hyps: list[str], refs: list[str]) -> MetricResult:
    return _label_f1(hyps, refs, False, "label_f1")


def label_f1_upos(hyps: list[str], refs: list[str]) -> MetricResult:
    return _label_f1(hyps, refs, True, "label_f1_upos")


def phantom_f1(hyps: list[str], refs: list[str], *, truth: Sequence) -> MetricResult:
    """Generated reports' positive labels vs the positive findings each phantom was rendered with."""
    pred = np.stack([present(_labels(h)) for h in hyps])
    true = np.stack([present(_truth_labels(t, i)) for i, t in enumerate(truth)])
    note = "truth: positive findings the phantoms were rendered with; labels: echocxr.data.labeler"
    return _result("phantom_f1", confusion(pred, true), True, note)


def _truth_labels(findings, index: int) -> list[tuple[str, str]]:
    """Findings (observation -> Finding) or their JSON form (observation -> dict) as (obs, status)."""
    if not isinstance(findings, dict):
        raise UserError(f"truth {index}: expected findings (a dict), got {type(findings).__name__}")
    out = []
    for obs, f in findings.items():
        try:
            f = f if isinstance(f, Finding) else Finding.from_dict({"observation": obs, **f})
        except (TypeError, ValueError) as e:
            raise UserError(f"truth {index}: bad finding {obs!r} ({e})") from None
        out.append((f.observation, f.status))
    # A phantom rendered with nothing abnormal is a normal study: the labeler's no_finding rule.
    if "no_finding" not in findings and not any(
        s != "negative" for o, s in out if o not in ("support_devices", "no_finding")
    ):
        out.append(("no_finding", "positive"))
    return out


# Minimum positives (phantoms drawn with the finding) for a finding to enter the abnormal
# macro-F1; one aggregate per minimum. Issue #13's targets read the ">= 10" one.
MIN_POSITIVES: tuple[int, ...] = (5, 10)
_ABNORMAL = np.array([o != "no_finding" for o in OBSERVATIONS])


def phantom_grounding(
    hyps: list[str], refs: list[str], *, truth: Sequence, min_positives: Sequence[int] = MIN_POSITIVES
) -> MetricResult:
    """Per-finding phantom-truth F1 and its macro mean over abnormal findings (issue #13).

    A finding is present in a report when the project labeler marks it positive (uncertain,
    negative and unmentioned count as absent); in the truth when the phantom was drawn with it
    positive. `no_finding` is left out. For each m in `min_positives`, `phantom_abn_macro_f1@m`
    averages the per-finding F1 over the abnormal findings with at least m positives in the
    truth of this eval set (`phantom_abn_findings@m` of them; 0.0 when there are none).
    Findings the model states but no included phantom has count only as false positives of
    nothing: they lower no macro term (see `phantom_f1` for those). Bootstrap resamples keep the
    finding set of the full eval set; a finding without tp, fp or fn in a resample is skipped
    there. Aggregates also hold `phantom_abn_f1/<obs>` for every abnormal finding with a
    positive and `phantom_abn_positives/<obs>` (counts, no interval).

    Raises UserError on a malformed truth or a minimum below 1.
    """
    mins = tuple(int(m) for m in min_positives)
    if not mins or min(mins) < 1:
        raise UserError(f"min_positives must be integers >= 1, got {list(min_positives)}")
    pred = np.stack([present(_labels(h)) for h in hyps])
    true = np.stack([present(_truth_labels(t, i)) for i, t in enumerate(truth)])
    counts = confusion(pred, true)  # [N, K, 3]
    positives = true.sum(axis=0)  # [K]
    names = np.array(OBSERVATIONS)
    scored = _ABNORMAL & (positives > 0)
    included = {m: _ABNORMAL & (positives >= m) for m in mins}

    def per_finding(c: np.ndarray) -> np.ndarray:
        tp, fp, fn = c.sum(axis=0).T  # [K] each
        denom = 2 * tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)

    def aggregate(c: np.ndarray) -> dict[str, float]:
        f1 = per_finding(c)
        out = {}
        for m, keep in included.items():
            vals = f1[keep]
            out[f"phantom_abn_macro_f1@{m}"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else 0.0
        out.update({f"phantom_abn_f1/{o}": float(v) for o, v in zip(names[scored], f1[scored])})
        return out

    full = aggregate(counts)
    for m, keep in included.items():
        full[f"phantom_abn_findings@{m}"] = float(keep.sum())
    full.update({f"phantom_abn_positives/{o}": float(n) for o, n in zip(names[scored], positives[scored])})
    abn = counts[:, _ABNORMAL].sum(axis=1)  # [N, 3] over abnormal findings
    per_sample = [
        {"phantom_abn_tp": float(tp), "phantom_abn_fp": float(fp), "phantom_abn_fn": float(fn)}
        for tp, fp, fn in abn
    ]
    note = (
        "truth: findings the phantoms were drawn with; labels: echocxr.data.labeler, present = positive "
        "(uncertain counts as absent); no_finding excluded; macro over abnormal findings with >= m positives"
    )
    return MetricResult(full, per_sample, note, lambda idx: aggregate(counts[idx]))
