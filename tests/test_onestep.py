"""One-step block decoding: fused == vanilla == a slow reference that recomputes everything,
forward counts, per-row EOS in a batch, with and without the AR token shift."""

from dataclasses import replace

import numpy as np
import pytest
import torch

import echocxr.decode.onestep as onestep
from echocxr.batch import Batch, Example, collate
from echocxr.decode.api import DecodeConfig, generate
from echocxr.model.config import get_preset
from echocxr.model.image_processing import make_image_processor
from echocxr.model.tokenizer import train_bpe
from echocxr.model.vlm import EchoVLM
from helpers import REPORTS as TEXTS
from helpers import noise_image, widen


@pytest.fixture(scope="module")
def tiny():
    tok = train_bpe(TEXTS, 400)
    cfg = get_preset("tiny")
    model = EchoVLM.from_config(cfg, tok, seed=0).eval()
    proc = make_image_processor(cfg.image_size)
    widen(model)  # so its tokens depend on the prompt and on what it committed
    # Random weights almost never pick <|im_end|>. To exercise per-row stopping, declare as "EOS" a
    # token the model does emit, chosen so that most rows end, in different blocks.
    batch, dc = _batch(tok, proc, cfg), _dc(max_new_tokens=40, block_size=4)
    plain, best = model.special, None
    for t in sorted({t for row in generate(model, batch, dc).tokens for t in row})[:30]:
        model.special = replace(plain, eos=t)
        ends = [len(r) // 4 for r in generate(model, batch, dc).tokens if r[-1] == t]
        best = max(best or (0, 0, t), (len(set(ends)), len(ends), t))
    model.special = replace(plain, eos=best[2])
    return model, tok, proc, cfg


def _dc(**kw) -> DecodeConfig:
    return DecodeConfig(decoder="onestep", steps=1, **kw)  # steps: unused by one-step decoding


def _batch(tok, proc, cfg):
    rng = np.random.default_rng(1)
    img = lambda: noise_image(rng)  # noqa: E731
    # Different prompt lengths (languages, image counts) so left padding is exercised.
    exs = [
        Example([img()], "en"),
        Example([img()], "zh"),
        Example([img(), img()], "en"),
        Example([img()], "en"),
    ]
    return collate(exs, tok, proc, cfg.image_tokens)


def _reference(model, batch, cfg, shift):
    """Greedy one-step decoding without a cache: for each block, one full forward over
    [prompt | committed blocks | mask block] with the decode attention rules written as loops."""
    eos, mask_id, B = model.special.eos, model.special.mask, cfg.block_size
    rows, P = batch.prompt_ids.shape
    n_blocks = -(-cfg.max_new_tokens // B)
    out = torch.empty(rows, 0, dtype=torch.long)
    done = torch.zeros(rows, dtype=torch.bool)
    for _ in range(n_blocks):
        ids = torch.cat([batch.prompt_ids, out, torch.full((rows, B), mask_id)], 1)
        S = ids.shape[1]
        valid = torch.cat([batch.prompt_valid, torch.ones(rows, S - P, dtype=torch.bool)], 1)
        allowed = torch.zeros(rows, 1, S, S, dtype=torch.bool)
        for q in range(S):
            for k in range(S):
                if q < P:
                    rule = k <= q  # the prompt is causal
                else:
                    rule = k < P or (k - P) // B <= (q - P) // B  # the response is block-causal
                allowed[:, 0, q, k] = rule
            allowed[:, 0, q] &= valid | (torch.arange(S) == q)  # padding keys hidden; own slot kept
        with torch.no_grad():
            h = model(
                model.embed(ids, batch.pixel_values, batch.grid_thw),
                model.positions(ids, batch.grid_thw, valid),
                allowed,
            )
            logits = model.logits(h)
        sl = slice(S - B - 1, S - 1) if shift else slice(S - B, S)
        tokens = logits[:, sl].argmax(-1)
        tokens = torch.where(done[:, None], eos, tokens)
        out = torch.cat([out, tokens], 1)
        done |= (tokens == eos).any(1)
        if bool(done.all()):
            break
    return [r[: r.index(eos) + 1] if eos in r else r for r in out.tolist()], out.shape[1] // B


@pytest.mark.parametrize("shift", [True, False])
def test_fused_equals_vanilla_equals_reference(tiny, monkeypatch, shift):
    model, tok, proc, cfg = tiny
    monkeypatch.setattr(onestep, "AR_SHIFT", shift)
    batch = _batch(tok, proc, cfg)
    dc = _dc(max_new_tokens=40, block_size=4)
    fused = generate(model, batch, dc)
    vanilla = generate(model, batch, _dc(max_new_tokens=40, block_size=4, fused=False))
    ref, n_ref = _reference(model, batch, dc, shift)
    assert fused.tokens == vanilla.tokens == ref
    n = fused.stats["blocks"]
    assert n == vanilla.stats["blocks"] == n_ref
    assert fused.forwards == n and vanilla.forwards == 2 * n  # plus the prefill, not counted


def test_rows_end_at_their_own_eos(tiny):
    model, tok, proc, cfg = tiny
    out = generate(model, _batch(tok, proc, cfg), _dc(max_new_tokens=40, block_size=4))
    eos = model.special.eos
    ended = [len(t) for t in out.tokens if t[-1] == eos]
    # the fixture picks an EOS that some rows reach in different blocks while others run on
    assert len({n // 4 for n in ended}) >= 2 and len(ended) < len(out.tokens)
    for t in out.tokens:
        assert eos not in t[:-1] and len(t) <= 40


def test_a_row_alone_matches_its_batch_row_and_stops_after_its_eos_block(tiny):
    model, tok, proc, cfg = tiny
    batch = _batch(tok, proc, cfg)
    dc = _dc(max_new_tokens=40, block_size=4)
    full = generate(model, batch, dc).tokens
    r = next(i for i, t in enumerate(full) if t[-1] == model.special.eos)
    pad = int((~batch.prompt_valid[r]).sum())
    patches = batch.grid_thw.prod(-1)
    per_study = [1, 1, 2, 1]  # images per study in _batch
    images = list(range(sum(per_study[:r]), sum(per_study[: r + 1])))
    first = int(patches[: images[0]].sum())
    one = Batch(
        batch.prompt_ids[r : r + 1, pad:],
        batch.prompt_valid[r : r + 1, pad:],
        batch.pixel_values[first : first + int(patches[images].sum())],
        batch.grid_thw[images],
    )
    for fused in (True, False):
        alone = generate(model, one, replace(dc, fused=fused))
        assert alone.tokens[0] == full[r]
        blocks = -(-len(full[r]) // 4)
        assert alone.stats["blocks"] == blocks and alone.forwards == blocks * (1 if fused else 2)


def test_sampling_is_seeded_and_fused_matches_vanilla(tiny):
    model, tok, proc, cfg = tiny
    batch = _batch(tok, proc, cfg)
    kw = dict(max_new_tokens=16, block_size=4, temperature=1.0, top_k=20, seed=3)
    a = generate(model, batch, _dc(**kw))
    b = generate(model, batch, _dc(**kw, fused=False))
    c = generate(model, batch, _dc(**{**kw, "seed": 4}))
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


@pytest.mark.parametrize("fused", [True, False])
def test_static_shape_step_equals_eager(tiny, fused):
    """The static-shape step (whole-capacity attention, KV written at a position tensor) that the
    CUDA graph captures gives the same tokens as the eager step."""
    model, tok, proc, cfg = tiny
    batch = _batch(tok, proc, cfg)
    dc = _dc(max_new_tokens=40, block_size=4, fused=fused)
    eager = generate(model, batch, dc, mode="eager")
    static = generate(model, batch, dc, mode="static")
    assert static.tokens == eager.tokens and static.forwards == eager.forwards


@pytest.mark.gpu
def test_cuda_graph_step_equals_eager(tiny):
    model, tok, proc, cfg = tiny
    gpu = model.to("cuda")
    batch = _batch(tok, proc, cfg).to("cuda")
    dc = _dc(max_new_tokens=40, block_size=4)
    try:
        eager = generate(gpu, batch, dc, mode="eager")
        graph = generate(gpu, batch, dc, mode="graph")
    finally:
        model.to("cpu")
    assert graph.tokens == eager.tokens
