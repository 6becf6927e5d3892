"""`echocxr eval commits`: what the block decoder commits at each denoising step, and how much
each commit depends on the image (issue #20, "why more teacher steps lose grounding").

The decoder runs on each study's own images. In lockstep, the same model reads the same partial
block (the same committed tokens and mask tokens) with the image-blind blank control in place of
the images (`eval.evaluate.blank_images`). For every committed position we keep

- the step s of its block at which it was committed and its in-block offset,
- log p_own(y): the committed token's log-probability under the study's own images,
- log p_blank(y): the same token's log-probability under the blank image, same context,
- whether the blank-image model's most probable token there is the same token.

image dependence = log p_own(y) - log p_blank(y), in nats: how much the image raised the token.
A commit the blank image agrees with (dependence near 0, same argmax) is template text. Summaries
per step s and per decoder setting show where in the trajectory the image-dependent tokens are
committed, and which tokens come first. Commits after a row's first EOS are left out.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from echocxr.errors import UserError
from echocxr.model import denoise
from echocxr.model.layout import AR_SHIFT, logits_for_block


@dataclass
class Commit:
    row: int
    block: int
    step: int
    offset: int  # in-block position 0..B-1
    token: int
    own: float  # log p_own(token)
    blank: float  # log p_blank(token), same partial block
    blank_agrees: bool  # the blank-image argmax is the same token


class PairedContext:
    """A block-loop context (`model.denoise.CachedContext` interface) that decodes with `ctx` and
    runs `blind` (the same model on image-blind inputs) on the same ids. After each forward it keeps
    both log-probability tables [rows, B, V]; at the next forward (or commit) the positions that
    changed from mask to a token are the ones the step committed, and are recorded as `Commit`s."""

    def __init__(self, model, ctx, blind, banned):
        self.model, self.ctx, self.blind, self.banned = model, ctx, blind, banned
        self.commits: list[Commit] = []
        self.block, self.step = 0, 0
        self._last = None  # (ids, own log-probs, blank log-probs) of the last denoising forward

    def _log_probs(self, h, first):
        return denoise.guard(logits_for_block(self.model, h, first, AR_SHIFT), self.banned).log_softmax(-1)

    def _record(self, ids: torch.Tensor) -> None:
        if self._last is None:
            return
        before, own, blank = self._last
        mask_id = self.model.special.mask
        changed = (before == mask_id) & (ids != mask_id)
        for r, j in changed.nonzero().tolist():
            t = int(ids[r, j])
            self.commits.append(
                Commit(
                    r,
                    self.block,
                    self.step - 1,
                    j,
                    t,
                    float(own[r, j, t]),
                    float(blank[r, j, t]),
                    int(blank[r, j].argmax()) == t,
                )
            )
        self._last = None

    def denoise(self, ids: torch.Tensor):
        self._record(ids)
        h, first = self.ctx.denoise(ids)
        hb, fb = self.blind.denoise(ids)
        self._last = (ids.clone(), self._log_probs(h, first), self._log_probs(hb, fb))
        self.step += 1
        return h, first

    def commit(self, ids: torch.Tensor) -> None:
        self._record(ids)
        self.ctx.commit(ids)
        self.blind.commit(ids)
        self.block, self.step = self.block + 1, 0

    def finish(self, tokens: list[list[int]], block: int) -> None:
        """Record the last block's final step from the decoded tokens (the loop does not commit
        its last block) and drop commits after each row's first EOS."""
        if self._last is not None:
            before = self._last[0]
            final = before.clone()
            start = self.block * block
            for r, t in enumerate(tokens):
                tail = t[start : start + block]
                final[r, : len(tail)] = torch.tensor(tail, dtype=torch.long)
                final[r, len(tail) :] = self.model.special.eos
            self._record(final)
        ends = [len(t) - 1 for t in tokens]
        self.commits = [c for c in self.commits if c.block * block + c.offset <= ends[c.row]]


def analyse_batch(
    model,
    batch,
    blind_batch,
    *,
    block: int,
    steps: int,
    strategy: str,
    threshold: float,
    max_new_tokens: int,
    banned,
) -> tuple[list[Commit], list[list[int]]]:
    """Decode `batch` with the block decoder (greedy) and record every commit's image dependence
    against `blind_batch` (the same prompts with the blank images). Returns (commits, tokens)."""
    n = -(-max_new_tokens // block) * block
    ctx = denoise.CachedContext(model, batch, n, block)
    blind = denoise.CachedContext(model, blind_batch, n, block)
    paired = PairedContext(model, ctx, blind, banned)
    out = denoise.denoise_blocks(
        model,
        paired,
        batch.size,
        block=block,
        steps=steps,
        max_new_tokens=max_new_tokens,
        strategy=strategy,
        threshold=threshold,
        banned=banned,
    )
    paired.finish(out.tokens, block)
    return paired.commits, out.tokens


def summarize(commits: list[Commit], tokenizer=None, top: int = 8) -> dict:
    """Per step s: commits, share, mean in-block offset, mean confidence (p_own), mean image
    dependence (nats), share where the blank image agrees; overall means; and the tokens most
    often committed at step 0 (decoded with `tokenizer` when given)."""
    from collections import Counter

    def stats(cs):
        n = len(cs)
        if not n:
            return {"commits": 0}
        dep = [c.own - c.blank for c in cs]
        return {
            "commits": n,
            "mean_offset": sum(c.offset for c in cs) / n,
            "mean_confidence": sum(math.exp(c.own) for c in cs) / n,
            "image_dependence": sum(dep) / n,
            "blank_agrees": sum(c.blank_agrees for c in cs) / n,
        }

    total = len(commits)
    by_step: dict[int, list[Commit]] = {}
    for c in commits:
        by_step.setdefault(c.step, []).append(c)
    per_step = []
    for s in sorted(by_step):
        row = {"step": s, **stats(by_step[s])}
        row["share"] = row["commits"] / total
        per_step.append(row)
    first = Counter(c.token for c in by_step.get(0, []))
    words = [
        (tokenizer.decode([t]) if tokenizer is not None else str(t), n / max(1, len(by_step.get(0, []))))
        for t, n in first.most_common(top)
    ]
    return {"overall": stats(commits), "per_step": per_step, "step0_top_tokens": words}


def run_analysis(
    ckpt: str,
    corpus: str,
    *,
    settings: list[tuple[int, str, float]],
    limit: int | None,
    batch_size: int,
    seed: int,
    device: str,
) -> list[dict]:
    """For each (steps K, strategy, threshold): decode the first `limit` studies of `corpus` with the
    block decoder of `ckpt` and summarize its commits. Raises UserError for a bad file."""
    from echocxr.batch import Example, collate
    from echocxr.eval.evaluate import EvalConfig, eval_images, load_checkpoint, load_records

    cfg = EvalConfig(ckpt=ckpt, corpus=corpus, out="", decoder="block", limit=limit, seed=seed, device=device)
    loaded = load_checkpoint(cfg)
    model, tok, proc = loaded.model, loaded.tokenizer, loaded.processor
    model.eval()
    records = load_records(cfg)
    root = Path(corpus).parent
    banned = loaded.engine.banned()
    batches = []
    for i in range(0, len(records), batch_size):
        own, blind = [], []
        for r in records[i : i + batch_size]:
            kw = dict(size=loaded.image_size, seed=seed, views=loaded.views, root=root)
            imgs, _, _ = eval_images(r, source="phantom", **kw)
            blank, _, _ = eval_images(r, source="blank", **kw)
            own.append(Example(imgs, r.language, None, r.record_id))
            blind.append(Example(blank, r.language, None, r.record_id))
        batches.append(tuple(collate(x, tok, proc, loaded.tokens_per_image).to(device) for x in (own, blind)))
    out = []
    for steps, strategy, threshold in settings:
        if not 1 <= steps <= loaded.block_size:
            raise UserError(f"--steps {steps}: must be in 1..{loaded.block_size} (the block size)")
        commits, n_tokens = [], 0
        for b, (own, blind) in enumerate(batches):
            with torch.no_grad():
                cs, toks = analyse_batch(
                    model,
                    own,
                    blind,
                    block=loaded.block_size,
                    steps=steps,
                    strategy=strategy,
                    threshold=threshold,
                    max_new_tokens=loaded.max_new_tokens,
                    banned=banned,
                )
            for c in cs:
                c.row += b * batch_size
            commits += cs
            n_tokens += sum(len(t) for t in toks)
        out.append(
            {
                "steps": steps,
                "strategy": strategy,
                "threshold": threshold,
                "studies": len(records),
                "tokens": n_tokens,
                **summarize(commits, tok),
            }
        )
    return out


def markdown(results: list[dict]) -> str:
    """The per-step table of every setting, for docs/DCD.md."""
    lines = []
    for res in results:
        o = res["overall"]
        lines.append(
            f"**K = {res['steps']}, {res['strategy']}, threshold {res['threshold']}** ({res['studies']} studies): "
            f"image dependence {o['image_dependence']:.3f} nats, blank agrees {o['blank_agrees']:.1%}; "
            "step 0 most committed: "
            + ", ".join(f"`{w.strip() or repr(w)}` {p:.0%}" for w, p in res["step0_top_tokens"][:5])
        )
        lines.append("")
        lines.append(
            "| step | share of commits | mean offset | mean p_own | image dependence (nats) | blank agrees |"
        )
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for r in res["per_step"]:
            lines.append(
                f"| {r['step']} | {r['share']:.1%} | {r['mean_offset']:.2f} | {r['mean_confidence']:.3f} | "
                f"{r['image_dependence']:.3f} | {r['blank_agrees']:.1%} |"
            )
        lines.append("")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a RAD (block diffusion) checkpoint")
    parser.add_argument("--corpus", required=True, help="eval_en.jsonl (phantom truth)")
    parser.add_argument("--out", required=True, help="folder for commits.json and commits.md")
    parser.add_argument("--steps", default="1,2,4,8", help="comma list of K (denoising steps per block)")
    parser.add_argument("--strategy", default=denoise.STRATEGY, help=f"comma list of {denoise.STRATEGIES}")
    parser.add_argument("--threshold", type=float, default=denoise.THRESHOLD)
    parser.add_argument("--limit", type=int, default=64, help="first N studies")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    try:
        ks = [int(k) for k in args.steps.split(",") if k]
    except ValueError:
        raise UserError(f"--steps must be a comma list of integers, got {args.steps!r}") from None
    strategies = [s for s in args.strategy.split(",") if s]
    bad = [s for s in strategies if s not in denoise.STRATEGIES]
    if bad:
        raise UserError(f"unknown --strategy {bad}; choose from {denoise.STRATEGIES}")
    settings = [(k, s, args.threshold) for s in strategies for k in ks]
    results = run_analysis(
        args.ckpt,
        args.corpus,
        settings=settings,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "commits.json").write_text(json.dumps(results, indent=1))
    (out / "commits.md").write_text(markdown(results))
    for r in results:
        print(json.dumps({k: r[k] for k in ("steps", "strategy", "threshold", "studies", "overall")}))
    print(f"wrote {out / 'commits.json'}, {out / 'commits.md'}")
    return 0
