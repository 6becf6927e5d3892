"""Stage 0 learning curves without the rendering cost: the experiment behind the Stage 0 step counts.

Renders `--epochs` fresh phantom epochs of the EN training studies once (cached as .npz in
`--cache`), then trains a fresh tower + multi-label head of a model preset on random draws from
that pool with the loss, weighting and schedule of `echocxr train --stage vision` (AdamW, linear
warmup, cosine to 10%, clip 1.0), and prints one JSON line per `--eval-every` steps with the head's
per-finding AUROC on the deterministic eval renders of the first 200 studies of eval_en.jsonl
(findings with >= 10 positives) and the macro AUROC on 200 training renders (`train_auroc`: a
gap to the eval value would be overfitting). Variants: `--pool meanmax` (mean and max over the
image tokens) and `--patch/--merge` (patch size and spatial merge of the tower).

    python scripts/stage0_curve.py --data runs/base/data --model base --steps 2400 --eval-every 400

Exploratory: it is not the pipeline's Stage 0 (which renders fresh images every step); its AUROC
table is `echocxr bench vision-head`'s, which scores the pipeline's own checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def render_pool(data: Path, size: int, epochs: int, cache: Path):
    from echocxr.data.images import study_images
    from echocxr.data.records import load_corpus
    from echocxr.train.vision import label_vector

    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, recs, eps in (
        (
            "train",
            [r for r in load_corpus(data / "corpus.jsonl", split="train") if r.language == "en"],
            epochs,
        ),
        ("eval", load_corpus(data / "eval_en.jsonl")[:200], None),
    ):
        f = cache / f"{name}_{size}_{eps}.npz"
        if not f.is_file():
            xs = [
                np.stack(
                    [
                        np.asarray(study_images(r, size=size, seed=0, epoch=e, source="phantom")[0])
                        for r in recs
                    ]
                )
                for e in (range(eps) if eps else [None])
            ]
            y = np.stack([label_vector(r, real=False).numpy() for r in recs]).astype(np.uint8)
            np.savez(f, X=np.stack(xs), Y=y)
        d = np.load(f)
        out[name] = (d["X"], torch.tensor(d["Y"]).float())
    return out


def auroc(z: torch.Tensor, y: torch.Tensor, min_pos: int = 10) -> tuple[float, dict]:
    """(macro AUROC, {finding: AUROC}) over findings with >= min_pos positives (bench.vision_head's table)."""
    from echocxr.bench.vision_head import auroc_table

    t = auroc_table(z, y, min_pos)
    per = {
        c: round(v["auroc"], 3)
        for c, v in t["per_finding"].items()
        if v["positives"] >= min_pos and v["auroc"] is not None
    }
    return t["macro_auroc"], per


def main() -> None:
    from transformers import AutoTokenizer

    from echocxr.model.config import get_preset
    from echocxr.model.image_processing import make_image_processor, preprocess
    from echocxr.model.tokenizer import train_bpe
    from echocxr.model.vlm import EchoVLM
    from echocxr.train.vision import CLASSES, positive_weight

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="`echocxr data build` output folder")
    p.add_argument("--cache", type=Path, default=Path("runs/stage0_pool"))
    p.add_argument("--model", default="base")
    p.add_argument("--epochs", type=int, default=12, help="rendered training epochs in the pool")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--pool", choices=("mean", "meanmax"), default="mean")
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--merge", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    cfg = get_preset(a.model)
    cfg = dataclasses.replace(cfg, patch_size=a.patch, spatial_merge_size=a.merge)
    pools = render_pool(a.data, cfg.image_size, a.epochs, a.cache)
    X, Y = pools["train"]
    Xe, Ye = pools["eval"]
    E, N = X.shape[:2]
    tok = train_bpe(["no finding"], cfg.vocab_size)  # the text side is unused here
    tok.save_pretrained(a.cache / "tok")
    tok = AutoTokenizer.from_pretrained(a.cache / "tok")
    model = EchoVLM.from_config(cfg, tok, seed=0)
    proc = make_image_processor(cfg.image_size)
    proc.patch_size, proc.merge_size = a.patch, a.merge
    D = model.lm.config.hidden_size
    head = torch.nn.Linear(D * (2 if a.pool == "meanmax" else 1), len(CLASSES))
    params = list(model.visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    pos_weight = positive_weight(Y)

    def logits(imgs) -> torch.Tensor:
        pv, grid = preprocess(proc, [Image.fromarray(x) for x in imgs])
        f = model.encode_images(pv, grid).float().view(len(imgs), -1, D)
        return head(torch.cat([f.mean(1), f.amax(1)], 1) if a.pool == "meanmax" else f.mean(1))

    def score(xs, ys) -> tuple[float, dict]:
        model.eval()
        with torch.no_grad():
            z = torch.cat([logits(xs[i : i + 50]) for i in range(0, len(xs), 50)])
        model.train()
        return auroc(z, ys)

    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        t = step / a.steps
        mult = min(1.0, step / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
        for group in opt.param_groups:
            group["lr"] = a.lr * mult
        idx = torch.randint(0, E * N, (a.batch_size,), generator=g).tolist()
        loss = F.binary_cross_entropy_with_logits(
            logits([X[i // N, i % N] for i in idx]), Y[[i % N for i in idx]], pos_weight=pos_weight
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % a.eval_every == 0 or step == a.steps:
            macro, per = score(Xe[0], Ye)
            train_macro, _ = score(X[0, :200], Y[:200])
            row = {"step": step, "s": round(time.time() - t0), "loss": round(loss.item(), 3)}
            print(
                json.dumps(row | {"eval_auroc": macro, "train_auroc": train_macro, "per_finding": per}),
                flush=True,
            )


if __name__ == "__main__":
    main()
