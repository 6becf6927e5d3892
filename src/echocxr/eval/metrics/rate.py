"""RaTEScore (Zhao et al., 2024) through the RaTEScore package, with local model folders.

The package's defaults download Angelakeke/RaTE-NER-Deberta and FremyCompany/BioLORD-2023-C from
the hub; here the user points ECHOCXR_RATE_NER_PATH and ECHOCXR_BIOLORD_PATH at local copies.
"""

from __future__ import annotations

import functools

from echocxr.eval.metrics import MetricResult


@functools.lru_cache(maxsize=1)
def _scorer(ner_path: str, biolord_path: str, batch_size: int, device: str):
    from RaTEScore import RaTEScore  # imports medspacy: only when this metric runs

    return RaTEScore(
        bert_model=ner_path, eval_model=biolord_path, batch_size=batch_size, use_gpu=device.startswith("cuda")
    )


def ratescore(
    hyps: list[str],
    refs: list[str],
    *,
    rate_ner_path: str,
    biolord_path: str,
    batch_size: int = 1,
    device: str = "cpu",
) -> MetricResult:
    scores = [
        float(s) for s in _scorer(rate_ner_path, biolord_path, batch_size, device).compute_score(hyps, refs)
    ]
    return MetricResult(
        {"ratescore": sum(scores) / len(scores)},
        [{"ratescore": s} for s in scores],
        f"RaTEScore package; NER {rate_ner_path}; embeddings {biolord_path}",
    )
