"""Bootstrap 95% confidence intervals for metric aggregates (percentile method over resampled studies).

Three cases, named in each interval's `method_note`:
- the aggregate is the mean of the per-sample scores: percentiles of resampled means;
- the adapter can recompute a corpus-level aggregate cheaply (BLEU from cached n-gram counts,
  micro-F1 from per-sample counts): percentiles of the recomputed aggregate;
- otherwise (METEOR's corpus score, CIDEr with document frequencies of the full set): the
  spread of resampled per-sample means, shifted to centre on the aggregate. An approximation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from echocxr.eval.metrics import MetricResult


@dataclass(frozen=True)
class Interval:
    lo: float
    hi: float
    method_note: str = ""  # empty for the plain percentile interval of a mean


def resample_indices(n_samples: int, n_resamples: int, seed: int) -> np.ndarray:
    """[n_resamples, n_samples] indices drawn with replacement; the same for every metric of a seed."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_samples, size=(n_resamples, n_samples))


def bootstrap_ci(
    result: MetricResult, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, Interval]:
    """Interval per aggregate key; keys without per-sample scores or a resampler get none."""
    n = len(result.per_sample)
    if n < 2 or n_resamples <= 0:
        return {}
    idx = resample_indices(n, n_resamples, seed)
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    out: dict[str, Interval] = {}
    if result.resample is not None:
        draws = [result.resample(row) for row in idx]
        for key in result.aggregate:
            values = np.array([d.get(key, np.nan) for d in draws], dtype=float)
            if key in draws[0] and not np.isnan(values).all():
                # nan: the value is undefined on that resample (e.g. an observation it lacks)
                lo, hi = np.nanpercentile(values, q)
                out[key] = Interval(float(lo), float(hi), "CI recomputes the corpus-level value")
    for key, value in result.aggregate.items():
        if key in out:
            continue
        scores = np.array([s.get(key, np.nan) for s in result.per_sample], dtype=float)
        if np.isnan(scores).all():
            continue
        means = np.nanmean(scores[idx], axis=1)
        lo, hi = np.percentile(means, q)
        full = float(np.nanmean(scores))
        if np.isclose(full, value, rtol=1e-9, atol=1e-12):
            out[key] = Interval(float(lo), float(hi))
        else:
            out[key] = Interval(
                float(value + lo - full),
                float(value + hi - full),
                "CI approximated from per-sample scores, shifted to the corpus value",
            )
    return out
