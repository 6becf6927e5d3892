"""CheXbert metrics: SembScore (cosine of CheXbert [CLS] states) and F1-CheXbert (labels, micro/macro F1).

CheXbert (Smit et al., 2020) is bert-base-uncased with 14 linear heads on the [CLS] state: 13
with classes (blank, positive, negative, uncertain) and "No Finding" with (blank, positive). The
user supplies the published checkpoint (`chexbert.pth`) and a local bert-base-uncased folder for
the config and tokenizer. Conventions follow the f1chexbert package used by RadEval: positive or
uncertain counts as present; sklearn-style F1 where a label with no true and no predicted
positives scores 0; "top 5" = cardiomegaly, edema, consolidation, atelectasis, pleural effusion.
"""

from __future__ import annotations

import functools

import numpy as np

from echocxr.errors import UserError
from echocxr.eval.metrics import MetricResult

CONDITIONS: tuple[str, ...] = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
)
TOP5: tuple[str, ...] = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
_TOP5 = np.array([c in TOP5 for c in CONDITIONS])
# Head classes: 0 blank, 1 positive, 2 negative, 3 uncertain ("No Finding": 0 blank, 1 positive).
_PRESENT_CLASSES = (1, 3)


def build_model(config):
    """The CheXbert module layout (parameter names match the published checkpoint)."""
    import torch
    from transformers import BertModel

    class CheXbert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertModel(config)
            self.dropout = torch.nn.Dropout(0.1)
            hidden = config.hidden_size
            heads = [torch.nn.Linear(hidden, 4) for _ in range(13)] + [torch.nn.Linear(hidden, 2)]
            self.linear_heads = torch.nn.ModuleList(heads)

        def forward(self, input_ids, attention_mask):
            cls = self.bert(input_ids, attention_mask=attention_mask)[0][:, 0, :]  # [B, H]
            return cls, [head(self.dropout(cls)) for head in self.linear_heads]

    return CheXbert()


@functools.lru_cache(maxsize=1)
def load_chexbert(checkpoint: str, bert_base: str, device: str = "cpu"):
    import torch
    from transformers import AutoTokenizer, BertConfig

    try:
        config = BertConfig.from_pretrained(bert_base, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(bert_base, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{bert_base}: not a bert-base-uncased folder ({e})") from None
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a bad file
        raise UserError(f"{checkpoint}: cannot read a CheXbert checkpoint ({e})") from None
    state = state.get("model_state_dict", state) if isinstance(state, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{checkpoint}: no model_state_dict in the checkpoint")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = build_model(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Older transformers saved the position_ids buffer; it carries no weights.
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise UserError(
            f"{checkpoint}: does not match the CheXbert layout (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return tokenizer, model.to(device).eval()


def run_chexbert(
    texts: list[str], checkpoint: str, bert_base: str, batch_size: int = 16, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """[N, H] [CLS] states and [N, 14] present (positive or uncertain) labels."""
    import torch

    tokenizer, model = load_chexbert(checkpoint, bert_base, device)
    states, labels = [], []
    for start in range(0, len(texts), batch_size):
        # CheXbert's own preprocessing: one line, single spaces; 512 word pieces at most.
        batch = [" ".join(t.split()) for t in texts[start : start + batch_size]]
        enc = tokenizer(batch, padding=True, truncation=True, max_length=512, return_tensors="pt")
        with torch.inference_mode():
            cls, logits = model(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        cls_ = torch.stack([lg.argmax(dim=-1) for lg in logits], dim=1)  # [B, 14] class ids
        states.append(cls.float().cpu().numpy())
        labels.append(np.isin(cls_.cpu().numpy(), _PRESENT_CLASSES))
    return np.concatenate(states), np.concatenate(labels)


def sembscore(
    hyps: list[str],
    refs: list[str],
    *,
    chexbert_path: str,
    bert_base_path: str,
    batch_size: int = 16,
    device: str = "cpu",
) -> MetricResult:
    h, _ = run_chexbert(hyps, chexbert_path, bert_base_path, batch_size, device)
    r, _ = run_chexbert(refs, chexbert_path, bert_base_path, batch_size, device)
    cos = (h * r).sum(1) / np.maximum(np.linalg.norm(h, axis=1) * np.linalg.norm(r, axis=1), 1e-12)
    scores = [float(c) for c in cos]
    return MetricResult(
        {"sembscore_chexbert": float(np.mean(scores))},
        [{"sembscore_chexbert": s} for s in scores],
        f"CheXbert checkpoint: {chexbert_path}",
    )


def _sklearn_f1(pred: np.ndarray, true: np.ndarray, scope: np.ndarray) -> tuple[float, float]:
    """Micro and macro F1 over the labels in `scope`, zero for a label with nothing to count."""
    p, t = pred[:, scope], true[:, scope]
    tp, fp, fn = (p & t).sum(0), (p & ~t).sum(0), (~p & t).sum(0)
    denom = 2 * tp + fp + fn
    micro = 2 * tp.sum() / denom.sum() if denom.sum() else 0.0
    per = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(micro), float(per.mean())


def f1_chexbert(
    hyps: list[str],
    refs: list[str],
    *,
    chexbert_path: str,
    bert_base_path: str,
    batch_size: int = 16,
    device: str = "cpu",
) -> MetricResult:
    _, pred = run_chexbert(hyps, chexbert_path, bert_base_path, batch_size, device)
    _, true = run_chexbert(refs, chexbert_path, bert_base_path, batch_size, device)
    all14 = np.ones(len(CONDITIONS), bool)

    def aggregate(idx: np.ndarray) -> dict[str, float]:
        micro14, macro14 = _sklearn_f1(pred[idx], true[idx], all14)
        micro5, macro5 = _sklearn_f1(pred[idx], true[idx], _TOP5)
        return {
            "f1_chexbert_micro14": micro14,
            "f1_chexbert_macro14": macro14,
            "f1_chexbert_micro5": micro5,
            "f1_chexbert_macro5": macro5,
        }

    per_sample = []
    for p, t in zip(pred, true):
        tp, fp, fn = (p & t).sum(), (p & ~t).sum(), (~p & t).sum()
        per_sample.append(
            {"f1_chexbert_sample_f1": float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 1.0}
        )
    return MetricResult(
        aggregate(np.arange(len(hyps))), per_sample, f"CheXbert checkpoint: {chexbert_path}", aggregate
    )
