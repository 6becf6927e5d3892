"""Corpus BLEU-4 from sacrebleu (13a tokenizer; sacrebleu's 'zh' tokenizer for Chinese), scaled to 0..1."""

from __future__ import annotations

import numpy as np

from echocxr.eval.metrics import MetricResult


def bleu(hyps: list[str], refs: list[str], *, language: str = "en") -> MetricResult:
    from sacrebleu.metrics import BLEU

    tokenize = "zh" if language == "zh" else "13a"
    corpus = BLEU(tokenize=tokenize)
    # Per-segment sufficient statistics: the corpus score and every resample are sums of them.
    # (`_extract_corpus_statistics` / `_compute_score_from_stats` are what sacrebleu's own paired
    # bootstrap uses; they are underscored but stable across sacrebleu 2.x.)
    stats = np.asarray(corpus._extract_corpus_statistics(hyps, [refs]), dtype=np.int64)  # [N, 2*4+2]
    sentence = BLEU(tokenize=tokenize, effective_order=True)

    def score(rows: np.ndarray) -> float:
        return corpus._compute_score_from_stats(rows.sum(axis=0).tolist()).score / 100.0

    per_sample = [
        {"bleu_sacrebleu": sentence._compute_score_from_stats(row.tolist()).score / 100.0} for row in stats
    ]
    note = (
        f"sacrebleu tokenize={tokenize}; per-sample values are sentence BLEU (effective order, exp smoothing)"
    )
    return MetricResult(
        {"bleu_sacrebleu": score(stats)},
        per_sample,
        note,
        lambda idx: {"bleu_sacrebleu": score(stats[idx])},
    )
