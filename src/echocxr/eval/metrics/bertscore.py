"""BERTScore (Zhang et al., 2020) by our own greedy cosine matching over a local encoder's token states.

Matches the bert-score package's default path (no idf weighting, no baseline rescaling): token
embeddings of one layer are L2-normalised; each hypothesis token takes its best cosine against
the reference tokens (precision), each reference token its best against the hypothesis
(recall); [CLS]/[SEP] take part as match candidates but carry zero weight. One difference:
bert-score zeroes similarities to padding before the max; here matching runs over real tokens
only (equal unless every similarity of a token is negative). An empty hypothesis scores 0.
"""

from __future__ import annotations

import functools

from echocxr.errors import UserError
from echocxr.eval.metrics import MetricResult


@functools.lru_cache(maxsize=2)
def _load(path: str, device: str):
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load a Hugging Face encoder from it ({e})") from None
    return tokenizer, model


def _embed(texts: list[str], path: str, layer: int | None, batch_size: int, device: str):
    """Per text: (L2-normalised token states [T, D], weights [T]: 0 on special tokens, else 1)."""
    import torch

    tokenizer, model = _load(path, device)
    out = []
    for start in range(0, len(texts), batch_size):
        batch = [t.strip() for t in texts[start : start + batch_size]]
        enc = tokenizer(
            batch, padding=True, truncation=True, return_tensors="pt", return_special_tokens_mask=True
        )
        special = enc.pop("special_tokens_mask")
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.inference_mode():
            states = model(**enc, output_hidden_states=True).hidden_states
        h = states[-1 if layer is None else layer]  # [B, T, D]
        h = torch.nn.functional.normalize(h.float(), dim=-1)
        for i in range(h.shape[0]):
            real = enc["attention_mask"][i].bool()
            out.append((h[i][real].cpu(), (1 - special[i][real.cpu()]).float()))
    return out


def bertscore(
    hyps: list[str],
    refs: list[str],
    *,
    bertscore_model: str,
    bertscore_layer: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> MetricResult:
    hyp_emb = _embed(hyps, bertscore_model, bertscore_layer, batch_size, device)
    ref_emb = _embed(refs, bertscore_model, bertscore_layer, batch_size, device)
    per_sample = []
    for text, (h, wh), (r, wr) in zip(hyps, hyp_emb, ref_emb):
        if not text.strip() or wh.sum() == 0 or wr.sum() == 0:
            p = rec = f = 0.0
        else:
            sim = h @ r.T  # [Th, Tr] cosines
            p = float((sim.max(dim=1).values * wh).sum() / wh.sum())
            rec = float((sim.max(dim=0).values * wr).sum() / wr.sum())
            f = 2 * p * rec / (p + rec) if p + rec > 0 else 0.0
        per_sample.append({"bertscore_greedy_p": p, "bertscore_greedy_r": rec, "bertscore_greedy_f1": f})
    n = len(per_sample)
    aggregate = {k: sum(d[k] for d in per_sample) / n for k in per_sample[0]}
    layer = "last" if bertscore_layer is None else str(bertscore_layer)
    return MetricResult(aggregate, per_sample, f"encoder: {bertscore_model}, layer {layer}")
