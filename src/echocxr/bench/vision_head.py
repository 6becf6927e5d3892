"""`echocxr bench vision-head`: how well does a Stage 0 tower see each finding?

Loads a Stage 0 checkpoint (`OUT/final` of `echocxr train --stage vision`: the Qwen2.5-VL weights
plus `vision_head.safetensors`), runs tower + head on the deterministic evaluation phantoms of an
eval file (`study_images(..., epoch=None)`, the images `echocxr eval` scores), and prints one JSON
line with each finding's AUROC (`sklearn.metrics.roc_auc_score`) against the findings the phantom
was drawn with (`train.vision.label_vector`), then a markdown table. The macro AUROC averages the
findings with at least `--min-positives` positives among the studies read.

This is the number the AR model's grounding follows (docs/PIPELINE.md: a finding the tower ranks
near chance is not written from the image), so it is the first thing to check when
`phantom_abn_macro_f1` is low.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from echocxr.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ckpt", required=True, help="Stage 0 output folder's final/ (has vision_head.safetensors)"
    )
    parser.add_argument("--corpus", required=True, help="eval file, e.g. data/eval_en.jsonl")
    parser.add_argument("--limit", type=int, default=200, help="studies read (default 200)")
    parser.add_argument(
        "--min-positives", type=int, default=10, help="findings in the macro AUROC (default 10)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (as `echocxr eval --seed`)")
    parser.add_argument("--device", default="cpu")


def head_logits(ckpt: Path, records, *, seed: int = 0, batch_size: int = 32, device: str = "cpu"):
    """(logits [N, C], labels [N, C]) of the Stage 0 head on the records' evaluation phantoms.

    Raises UserError when `ckpt` has no `vision_head.safetensors` (not a Stage 0 checkpoint).
    """
    from safetensors.torch import load_file

    from echocxr.batch import Example, collate
    from echocxr.data.images import study_images
    from echocxr.data.phantom import MIN_SIZE
    from echocxr.model.vlm import EchoVLM
    from echocxr.train.vision import HEAD_FILE, attach_head, label_vector, pooled_features

    head_file = Path(ckpt) / HEAD_FILE
    if not head_file.is_file():
        raise UserError(
            f"{head_file}: not found; --ckpt must be the final/ folder of `echocxr train --stage vision`"
        )
    model, tok, proc, _ = EchoVLM.from_pretrained(ckpt, device=device)
    attach_head(model, 0)
    model.vision_head.load_state_dict(load_file(head_file))
    model.eval()
    size = max(model.config.image_size, MIN_SIZE)
    z, y = [], []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        exs = [
            Example(study_images(r, size=size, seed=seed, source="phantom"), r.language, None, r.record_id)
            for r in chunk
        ]
        batch = collate(exs, tok, proc, model.config.image_tokens).to(model.device)
        with torch.no_grad():
            z.append(model.vision_head(pooled_features(model, batch).float()).cpu())
        y.append(torch.stack([label_vector(r, real=False) for r in chunk]))
    return torch.cat(z), torch.cat(y)


def auroc_table(z: torch.Tensor, y: torch.Tensor, min_positives: int) -> dict:
    """Per-finding AUROC (None where a finding has no positives or no negatives) and the macro
    AUROC over findings with >= min_positives positives."""
    from sklearn.metrics import roc_auc_score

    from echocxr.train.vision import CLASSES

    per = {}
    for k, c in enumerate(CLASSES):
        pos = int(y[:, k].sum())
        both = 0 < pos < len(y)
        auc = round(float(roc_auc_score(y[:, k].numpy(), z[:, k].numpy())), 4) if both else None
        per[c] = {"positives": pos, "auroc": auc}
    kept = [v["auroc"] for v in per.values() if v["positives"] >= min_positives and v["auroc"] is not None]
    return {
        "macro_auroc": round(float(np.mean(kept)), 4) if kept else None,
        "findings_in_macro": len(kept),
        "min_positives": min_positives,
        "per_finding": per,
    }


def run(args: argparse.Namespace) -> int:
    from echocxr.data.records import load_corpus

    if not Path(args.corpus).is_file():
        raise UserError(f"{args.corpus}: eval file not found (make one with `echocxr data build`)")
    records = load_corpus(args.corpus)[: args.limit]
    if not records:
        raise UserError(f"{args.corpus}: no records")
    z, y = head_logits(
        Path(args.ckpt), records, seed=args.seed, batch_size=args.batch_size, device=args.device
    )
    out = {"ckpt": str(args.ckpt), "corpus": str(args.corpus), "studies": len(records)}
    out.update(auroc_table(z, y, args.min_positives))
    print(json.dumps(out))
    print("\n| finding | positives | AUROC |\n| --- | ---: | ---: |")
    for c, v in sorted(out["per_finding"].items(), key=lambda kv: -kv[1]["positives"]):
        if v["positives"]:
            auc = "n/a" if v["auroc"] is None else f"{v['auroc']:.3f}"
            print(f"| {c} | {v['positives']} | {auc} |")
    return 0
