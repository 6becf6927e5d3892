"""Block-8 diagnostics behind docs/RAD.md, "Block 8" (a diagnostic script, not part of the package).

    python scripts/block8_diagnose.py tf    CKPT EVAL_JSONL   # teacher-forced accuracy by mask count
    python scripts/block8_diagnose.py trace CKPT EVAL_JSONL [RULE]   # K=2 vs K=8: first diverging block
    python scripts/block8_diagnose.py ref   CKPT EVAL_JSONL   # cached vs uncached decoder at K=8
    python scripts/block8_diagnose.py eval  CKPT EVAL_JSONL OUT RULE:K ...   # echocxr eval per rule
    python scripts/block8_diagnose.py table LABEL=EVAL_DIR ...               # markdown table
    python scripts/block8_diagnose.py cli-global ARGS ...  # `echocxr ARGS` with the pre-fix rule

RULE (the confidence_dynamic fill rule, swapped into model.denoise.choose for the run): `window`
(the current rule), `global` (the rule before the fix: most confident anywhere), `leftmost`
(fill strictly left to right), `w3` (most confident among the 3 leftmost masked), `seq`
(strategy sequential), or the decoders `ar` / `onestep` (K ignored). The phantom studies are the
first 64 (tf, trace, ref) or 200 (eval) records of EVAL_JSONL; block size 8.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch

B = 8


def rule_global(conf, masked, steps_left, strategy, threshold):
    """model.denoise.choose for confidence_dynamic before the fix (most confident anywhere)."""
    n = torch.maximum(-(-masked.sum(1) // steps_left), ((conf > threshold) & masked).sum(1))
    return _top(conf, masked, n)


def rule_window(conf, masked, steps_left, strategy, threshold, window=None, leftmost=False):
    """Above-threshold positions, then the scheduled count from the `window` leftmost masked
    positions (None: 2n), by confidence or (leftmost) by position."""
    n = -(-masked.sum(1) // steps_left)
    above = (conf > threshold) & masked
    w = 2 * n[:, None] if window is None else window
    in_window = masked & (masked.long().cumsum(1) - 1 < w)
    pos = torch.arange(masked.shape[1], dtype=conf.dtype).expand_as(conf)
    inner = (1 - pos / masked.shape[1]) if leftmost else conf
    score = torch.where(above, 2.0, torch.where(in_window, inner, -1.0 - pos))
    return _top(score, masked, torch.maximum(n, above.sum(1)))


def _top(score, masked, n):
    score = score.masked_fill(~masked, float("-inf"))
    order = score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(masked.shape[1]).expand_as(order))
    return (rank < n[:, None]) & masked


RULES = {
    "global": rule_global,
    "leftmost": functools.partial(rule_window, leftmost=True, window=B),
    "w3": functools.partial(rule_window, window=3),
}


def load(ckpt: str, corpus: str, limit: int = 64):
    from echocxr.batch import Example, collate
    from echocxr.eval.evaluate import EvalConfig, load_records, record_images
    from echocxr.model.vlm import EchoVLM

    model, tok, proc, _ = EchoVLM.from_pretrained(ckpt)
    model.eval()
    recs = load_records(EvalConfig(ckpt="", corpus=corpus, out="", limit=limit))
    batches = []
    for i in range(0, len(recs), 16):
        ex = []
        for r in recs[i : i + 16]:
            size, root = model.config.image_size, Path(corpus).parent
            imgs, _ = record_images(r, size=size, seed=0, source="phantom", views=("frontal",), root=root)
            ex.append(Example(imgs, r.language, r.report, r.record_id))
        cfg = model.config
        batches.append(
            collate(ex, tok, proc, cfg.image_tokens, max_response=cfg.max_response_tokens, multiple_of=B)
        )
    return model, tok, batches


@torch.no_grad()
def teacher_forced(ckpt: str, corpus: str) -> None:
    """Accuracy of the argmax at masked content positions (before each row's EOS) in the RAD
    layout, for exactly n masked positions per block, by in-block position."""
    from echocxr.train.rad import rad_inputs, response_logit_index

    model, _, batches = load(ckpt, corpus)
    g = torch.Generator().manual_seed(0)
    print("n masked | accuracy at in-block position 0..7 | all")
    for n in range(1, B + 1):
        hit, cnt = torch.zeros(B), torch.zeros(B)
        for _ in range(2):
            for b in batches:
                x0 = b.response_ids
                rows, P = b.prompt_ids.shape
                R = x0.shape[1]
                rank = torch.rand(rows, R // B, B, generator=g).argsort(-1).argsort(-1)
                masked = (rank < n).reshape(rows, R)
                x, pos, m = rad_inputs(
                    model, b, torch.where(masked, model.special.mask, x0), freeze_vision=True, block=B
                )
                pred = model.logits(model(x, pos, m)[:, response_logit_index(P, R, B)]).argmax(-1)
                content = torch.arange(R)[None] < (b.response_len[:, None] - 1)
                sel = masked & content
                j = torch.arange(R) % B
                for p in range(B):
                    s = sel & (j == p)[None]
                    hit[p] += (pred == x0)[s].sum()
                    cnt[p] += s.sum()
        print(n, " ".join(f"{h / c:.3f}" for h, c in zip(hit, cnt)), f"{hit.sum() / cnt.sum():.3f}")


def trace(ckpt: str, corpus: str, rule: str = "window", rows_shown: int = 3) -> None:
    """Decode with K=2 and K=8 (RULE: see the module docstring); for the first rows that differ,
    the steps of their first diverging block (positions, tokens, confidences)."""
    from echocxr.decode import api
    from echocxr.decode.api import DecodeConfig
    from echocxr.model import denoise as block  # the loop reads model.denoise.choose

    block.choose = RULES.get(rule, block.choose)

    model, tok, batches = load(ckpt, corpus)
    mx = model.config.max_response_tokens
    cfg = {
        K: DecodeConfig(decoder="block", block_size=B, steps=K, max_new_tokens=mx, record_trajectory=True)
        for K in (2, 8)
    }
    shown = 0
    for b in batches:
        o2, o8 = api.generate(model, b, cfg[2]), api.generate(model, b, cfg[8])
        for r, (a, c) in enumerate(zip(o2.tokens, o8.tokens)):
            if a == c or shown >= rows_shown:
                continue
            d = next(i for i in range(len(a) + 1) if i >= min(len(a), len(c)) or a[i] != c[i])
            k = d // B
            print(
                f"row {r}: block {k}: K=2 {tok.decode(a[k * B : k * B + B])!r} | K=8 {tok.decode(c[k * B : k * B + B])!r}"
            )
            for K, o in ((8, o8), (2, o2)):
                for s, st in enumerate(o.trajectory[r][k]):
                    words = [tok.decode([t]) for t in st.tokens]
                    print(
                        f"  K={K} step {s}: positions {st.positions} {words} conf {[round(x, 2) for x in st.confidence]}"
                    )
            shown += 1


def reference(ckpt: str, corpus: str) -> None:
    from echocxr.decode import api
    from echocxr.decode.api import DecodeConfig

    model, _, batches = load(ckpt, corpus)
    cfg = DecodeConfig(
        decoder="block", block_size=B, steps=8, max_new_tokens=model.config.max_response_tokens
    )
    same = sum(
        x == y
        for b in batches
        for x, y in zip(
            api.generate(model, b, cfg).tokens, api.generate(model, b, cfg, reference=True).tokens
        )
    )
    print(f"cached == uncached reference at K=8: {same}/{sum(b.size for b in batches)} rows identical")


def evaluate_rules(ckpt: str, corpus: str, out: str, specs: list[str]) -> None:
    from echocxr.eval.evaluate import EvalConfig, evaluate
    from echocxr.model import denoise as block  # the loop reads model.denoise.choose

    current = block.choose
    for spec in specs:
        rule, K = spec.split(":")
        decoder = rule if rule in ("ar", "onestep") else "block"
        block.choose = RULES.get(rule, current)
        cfg = EvalConfig(
            ckpt=ckpt,
            corpus=corpus,
            out=f"{out}/{rule}_k{K}",
            decoder=decoder,
            steps=int(K) if decoder == "block" else None,
            strategy="sequential" if rule == "seq" else "confidence_dynamic",
            batch_size=16,
            limit=200,
            metrics=("rougeL_coco", "label_f1", "phantom_f1"),
            bootstrap=200,
        )
        agg = evaluate(cfg, progress=False)
        m = agg["metrics"]["en"]
        print(spec, {k: round(m[k]["value"], 3) for k in ("rougeL_coco", "phantom_f1_micro")}, flush=True)
    block.choose = current


def abnormal_macro(pred: np.ndarray, true: np.ndarray, min_pos: int = 5) -> float:
    """Macro F1 over abnormal observations (no_finding left out) with >= min_pos true positives."""
    from echocxr.eval.metrics.labels import OBSERVATIONS

    f1 = []
    for k, o in enumerate(OBSERVATIONS):
        if o == "no_finding" or true[:, k].sum() < min_pos:
            continue
        tp, fp = (pred[:, k] & true[:, k]).sum(), (pred[:, k] & ~true[:, k]).sum()
        fn = (~pred[:, k] & true[:, k]).sum()
        f1.append(2 * tp / max(2 * tp + fp + fn, 1))
    return float(np.mean(f1))


def table(pairs: list[str]) -> None:
    from echocxr.eval.metrics.labels import _labels, _truth_labels, present

    print(
        "| decoder | tokens/report | forwards/token | distinct | ROUGE-L | phantom F1 micro | abnormal macro-F1 |"
    )
    print("|---|---|---|---|---|---|---|")
    for pair in pairs:
        label, d = pair.rsplit("=", 1)
        agg = json.loads(Path(d, "aggregate.json").read_text())
        s = [json.loads(line) for line in Path(d, "samples.jsonl").read_text().splitlines()]
        pred = np.stack([present(_labels(x["hypothesis"])) for x in s])
        true = np.stack([present(_truth_labels(x["truth"], i)) for i, x in enumerate(s)])
        rng = np.random.default_rng(0)
        boot = [
            abnormal_macro(pred[i], true[i]) for i in (rng.integers(0, len(s), len(s)) for _ in range(300))
        ]
        m = agg["metrics"]["en"]
        cell = {k: f"{m[k]['value']:.3f} [{m[k]['ci95'][0]:.3f}, {m[k]['ci95'][1]:.3f}]" for k in m}
        sp = agg["speed"]
        print(
            f"| {label} | {sp['mean_tokens']:.1f} | {sp['forwards_per_token']:.3f} | {len({x['hypothesis'] for x in s})} "
            f"| {cell['rougeL_coco']} | {cell['phantom_f1_micro']} | {abnormal_macro(pred, true):.3f} "
            f"[{np.percentile(boot, 2.5):.3f}, {np.percentile(boot, 97.5):.3f}] |"
        )


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    cmd, args = argv[0], argv[1:]
    if cmd == "table":
        table(args)
    elif cmd == "cli-global":  # e.g. the DCD stage distilling a teacher decoded with the old rule
        from echocxr.cli import main as cli
        from echocxr.model import denoise as block  # the loop reads model.denoise.choose

        block.choose = rule_global
        sys.exit(cli(args))
    elif cmd == "eval":
        evaluate_rules(args[0], args[1], args[2], args[3:])
    else:
        {"tf": teacher_forced, "trace": trace, "ref": reference}[cmd](*args)


if __name__ == "__main__":
    main(sys.argv[1:])
