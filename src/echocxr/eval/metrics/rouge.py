"""ROUGE-L F-measure from Google's rouge-score package (Porter stemmer), averaged over studies."""

from __future__ import annotations

from echocxr.eval.metrics import MetricResult
from echocxr.eval.metrics.tokenize import zh_char_tokenize


class _CharTokenizer:
    """rouge-score's default tokenizer keeps only [a-z0-9]: it would erase Chinese text entirely."""

    def tokenize(self, text: str) -> list[str]:
        return zh_char_tokenize(text).split()


def rouge_l(hyps: list[str], refs: list[str], *, language: str = "en") -> MetricResult:
    from rouge_score import rouge_scorer

    if language == "zh":
        scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CharTokenizer())
        note = "tokens: Chinese characters"
    else:
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        note = "rouge-score default tokenizer, Porter stemmer"
    # rouge-score's argument order is (target, prediction).
    scores = [float(scorer.score(r, h)["rougeL"].fmeasure) for h, r in zip(hyps, refs)]
    mean = sum(scores) / len(scores) if scores else 0.0
    return MetricResult({"rougeL_rouge_score": mean}, [{"rougeL_rouge_score": s} for s in scores], note)
