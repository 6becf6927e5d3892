"""BLEU-1..4, METEOR, ROUGE-L and CIDEr from pycocoevalcap, the reference COCO caption code.

Texts are tokenized as COCO does (PTB, lower-cased, punctuation dropped; see tokenize.py) or,
for Chinese, into characters. One reference per study.
"""

from __future__ import annotations

import functools

import numpy as np

from echocxr.eval.metrics import MetricResult
from echocxr.eval.metrics.tokenize import coco_tokenize


def _inputs(hyps: list[str], refs: list[str], language: str, tokenizer: str):
    hyp_tok, note = coco_tokenize(hyps, language, tokenizer)
    ref_tok, _ = coco_tokenize(refs, language, tokenizer)
    res = {i: [h] for i, h in enumerate(hyp_tok)}
    gts = {i: [r] for i, r in enumerate(ref_tok)}
    return res, gts, note


def bleu(hyps: list[str], refs: list[str], *, language: str = "en", tokenizer: str = "auto") -> MetricResult:
    """Corpus BLEU-1..4 as COCO computes it; per-sample BLEU from the same scorer."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    res, gts, note = _inputs(hyps, refs, language, tokenizer)
    scorer = BleuScorer(n=4)
    for i in res:
        scorer += (res[i][0], gts[i])
    corpus, per_n = scorer.compute_score(option="closest", verbose=0)
    keys = [f"bleu{k}_coco" for k in range(1, 5)]
    per_sample = [{key: float(per_n[k][i]) for k, key in enumerate(keys)} for i in range(len(hyps))]

    def resample(idx: np.ndarray) -> dict[str, float]:
        # Reuses the cooked n-gram counts, so a resample costs no tokenizing or counting.
        again = BleuScorer(n=4)
        again.crefs = [scorer.crefs[i] for i in idx]
        again.ctest = [scorer.ctest[i] for i in idx]
        score, _ = again.compute_score(option="closest", verbose=0)
        return dict(zip(keys, map(float, score)))

    return MetricResult(dict(zip(keys, map(float, corpus))), per_sample, note, resample)


def rouge_l(
    hyps: list[str], refs: list[str], *, language: str = "en", tokenizer: str = "auto"
) -> MetricResult:
    from pycocoevalcap.rouge.rouge import Rouge

    res, gts, note = _inputs(hyps, refs, language, tokenizer)
    mean, scores = Rouge().compute_score(gts, res)
    return MetricResult({"rougeL_coco": float(mean)}, [{"rougeL_coco": float(s)} for s in scores], note)


def cider(hyps: list[str], refs: list[str], *, language: str = "en", tokenizer: str = "auto") -> MetricResult:
    """CIDEr (COCO's, with the x10 scale). Document frequencies come from this set's references."""
    from pycocoevalcap.cider.cider import Cider

    res, gts, note = _inputs(hyps, refs, language, tokenizer)
    mean, scores = Cider().compute_score(gts, res)
    if len(hyps) < 2:
        note += "; with one study every n-gram has idf 0, so CIDEr is 0"
    return MetricResult({"cider_coco": float(mean)}, [{"cider_coco": float(s)} for s in scores], note)


@functools.lru_cache(maxsize=1)
def _meteor():
    # The jar takes seconds to start and load its paraphrase tables: one process per Python process.
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def meteor(
    hyps: list[str], refs: list[str], *, language: str = "en", tokenizer: str = "auto"
) -> MetricResult:
    """METEOR 1.5 (English mode, -norm). The aggregate is the jar's corpus score, not the mean."""
    res, gts, note = _inputs(hyps, refs, language, tokenizer)
    # "|||" separates fields in the jar's protocol; COCO strips it from hypotheses only.
    res = {i: [_strip_bars(v[0])] for i, v in res.items()}
    gts = {i: [_strip_bars(v[0])] for i, v in gts.items()}
    corpus, scores = _meteor().compute_score(gts, res)
    if language == "zh":
        note += "; METEOR on characters: exact matches only (its stemmer and synonyms are English)"
    return MetricResult({"meteor_coco": float(corpus)}, [{"meteor_coco": float(s)} for s in scores], note)


def _strip_bars(text: str) -> str:
    return " ".join(text.replace("|", " ").split())
