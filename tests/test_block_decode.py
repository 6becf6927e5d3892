"""Multi-step block decoding: cached == uncached reference token for token, forward counts,
strategies, per-row EOS in a batch, and the recorded trajectory."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from echocxr.batch import Example, collate
from echocxr.decode.api import DecodeConfig, generate
from echocxr.model.config import get_preset
from echocxr.model.image_processing import make_image_processor
from echocxr.model.tokenizer import train_bpe
from echocxr.model.vlm import EchoVLM
from helpers import REPORTS as TEXTS
from helpers import noise_image


def _examples():
    rng = np.random.default_rng(3)
    img = lambda: noise_image(rng)  # noqa: E731
    # different prompt lengths (language, image count): left padding is exercised
    return [Example([img()], "en"), Example([img(), img()], "zh"), Example([img()], "en")]


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    tok = train_bpe(TEXTS, 400)
    cfg = get_preset("tiny")
    # float64: cached and uncached attention differ only by rounding, far below any confidence gap
    model = EchoVLM.from_config(cfg, tok, seed=0, dtype=torch.float64).eval()
    # A tiny model at the default init (std 0.02) emits nearly uniform, input-blind distributions;
    # a wider init makes its choices depend on the prompt and on the tokens it committed.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.hf.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    proc = make_image_processor(cfg.image_size)
    exs = _examples()
    batch = collate(exs, tok, proc, cfg.image_tokens)
    # Random weights almost never emit <|im_end|>. Declare as EOS a token this model does emit,
    # picked so that rows end in different blocks (per-row stopping is then exercised).
    dc = DecodeConfig(decoder="block", max_new_tokens=32, block_size=4, steps=2)
    plain = model.special
    seen = sorted({t for row in generate(model, batch, dc).tokens for t in row})
    best = None
    for t in seen[:40]:
        model.special = replace(plain, eos=t)
        rows = generate(model, batch, dc).tokens
        ends = {len(r) for r in rows if r[-1] == t}
        score = (len(ends), -abs(len(ends) - len(rows)), t)
        best = score if best is None or score > best else best
    model.special = replace(plain, eos=best[2])
    yield model, tok, proc, cfg, batch, exs
    model.special = plain


STRATEGIES = ["confidence_dynamic", "confidence_static", "sequential"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("block", "steps"), [(4, 2), (8, 8)])  # (8, 8): the DCD teacher's setting
def test_cached_equals_uncached_reference(tiny, strategy, block, steps):
    model, _, _, _, batch, _ = tiny
    dc = DecodeConfig(
        decoder="block",
        max_new_tokens=32 if block == 4 else 16,  # 8 blocks of 4 / 2 blocks of 8 (time)
        block_size=block,
        steps=steps,
        strategy=strategy,
        threshold=0.3,
    )
    fast = generate(model, batch, dc)
    slow = generate(model, batch, dc, reference=True)
    assert fast.tokens == slow.tokens
    assert fast.forwards == slow.forwards
    # the static-shape step (whole-capacity attention, KV written at a position tensor) agrees too
    assert generate(model, batch, dc, mode="static").tokens == fast.tokens


def test_rows_stop_at_their_own_eos(tiny):
    model, tok, proc, cfg, batch, exs = tiny
    eos = model.special.eos
    dc = DecodeConfig(decoder="block", max_new_tokens=32, block_size=4, steps=2, strategy="confidence_static")
    out = generate(model, batch, dc)
    ended = [r for r in out.tokens if r[-1] == eos]
    assert len({len(r) for r in ended}) >= 2, "fixture should make rows end in different blocks"
    for r in out.tokens:
        assert eos not in r[:-1]  # cut at the first EOS
        assert len(r) <= dc.max_new_tokens
    # a row decoded alone gives the same tokens as in the batch: padding and stopping are per row
    for b, ex in enumerate(exs):
        alone = collate([ex], tok, proc, cfg.image_tokens)
        assert generate(model, alone, dc).tokens[0] == out.tokens[b]


@pytest.fixture
def no_eos(tiny):
    """The model with its real <|im_end|> as EOS, which the random weights never emit here."""
    model, *_ = tiny
    declared = model.special
    model.special = replace(declared, eos=tiny[1].convert_tokens_to_ids("<|im_end|>"))
    yield model
    model.special = declared


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_forward_count(tiny, no_eos, steps):
    batch = tiny[4]
    dc = DecodeConfig(
        decoder="block", max_new_tokens=12, block_size=4, steps=steps, strategy="confidence_static"
    )
    out = generate(no_eos, batch, dc)
    assert all(len(r) == 12 and no_eos.special.eos not in r for r in out.tokens)
    # K denoising forwards per block, one commit forward per block except the last
    assert out.forwards == 3 * steps + 2
    assert out.stats["blocks"] == 3


def test_sequential_commits_one_token_per_step_left_to_right(tiny, no_eos):
    batch = tiny[4]
    dc = DecodeConfig(
        decoder="block",
        max_new_tokens=8,
        block_size=4,
        steps=4,
        strategy="sequential",
        record_trajectory=True,
    )
    out = generate(no_eos, batch, dc)
    assert out.forwards == 2 * 4 + 1
    for row, traj in zip(out.tokens, out.trajectory, strict=True):
        assert len(traj) == 2
        for b, steps in enumerate(traj):
            assert [rec.positions for rec in steps] == [[0], [1], [2], [3]]
            assert [rec.tokens[0] for rec in steps] == row[b * 4 : (b + 1) * 4]


def test_dynamic_threshold_finishes_blocks_early(tiny, no_eos):
    batch = tiny[4]
    low = DecodeConfig(decoder="block", max_new_tokens=8, block_size=4, steps=4, threshold=0.0)
    # threshold 0: every position clears it at the first step, one denoising forward per block
    assert generate(no_eos, batch, low).forwards == 2 * 1 + 1
    high = replace(low, threshold=1.0)  # never reached: the schedule alone, one token per step
    assert generate(no_eos, batch, high).forwards == 2 * 4 + 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_trajectory_records(tiny, strategy):
    model, _, _, _, batch, _ = tiny
    K, B, k = 3, 4, 5
    dc = DecodeConfig(
        decoder="block",
        max_new_tokens=32,
        block_size=B,
        steps=K,
        strategy=strategy,
        threshold=0.3,
        record_trajectory=True,
        trajectory_top_k=k,
    )
    out = generate(model, batch, dc)
    assert len(out.trajectory) == batch.size
    for row, traj in zip(out.tokens, out.trajectory, strict=True):
        assert len(traj) == -(-len(row) // B)  # one entry per decoded block, up to the EOS block
        for b, steps in enumerate(traj):
            assert 1 <= len(steps) <= K
            seen = sorted(p for rec in steps for p in rec.positions)
            assert seen == list(range(B))  # every position committed exactly once
            for rec in steps:
                n = len(rec.positions)
                assert rec.positions == sorted(rec.positions)
                assert rec.top_idx.shape == (n, k) and rec.top_p.shape == (n, k) and rec.rest.shape == (n,)
                assert torch.all(rec.top_p[:, :-1] >= rec.top_p[:, 1:])
                assert torch.allclose(rec.top_p.sum(-1) + rec.rest, torch.ones(n), atol=1e-5)
                # greedy: the committed token is the mode, its confidence the mode's probability
                assert rec.top_idx[:, 0].tolist() == rec.tokens
                assert torch.allclose(rec.top_p[:, 0], torch.tensor(rec.confidence, dtype=torch.float32))
                for p, t in zip(rec.positions, rec.tokens, strict=True):
                    if b * B + p < len(row):
                        assert row[b * B + p] == t


def test_sampling_is_seeded(tiny):
    model, _, _, _, batch, _ = tiny
    dc = DecodeConfig(decoder="block", max_new_tokens=16, block_size=4, steps=2, temperature=1.0, top_k=20)
    a = generate(model, batch, dc).tokens
    assert generate(model, batch, dc).tokens == a
    assert generate(model, batch, replace(dc, seed=1)).tokens != a
    greedy = generate(model, batch, replace(dc, temperature=0.0)).tokens
    assert greedy != a
