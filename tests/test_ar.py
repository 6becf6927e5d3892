"""AR decoding: greedy output equals transformers' generate on the same weights (batch 1 and a
ragged left-padded batch), cached == a loop that recomputes the whole context every step,
static-shape step == eager step, per-row EOS stopping, sampling is seeded."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from echocxr.batch import Example, collate
from echocxr.decode.api import DecodeConfig, generate
from echocxr.decode.common import text_positions
from echocxr.model.config import get_preset
from echocxr.model.image_processing import make_image_processor
from echocxr.model.tokenizer import train_bpe
from echocxr.model.vlm import EchoVLM
from helpers import REPORTS as TEXTS
from helpers import noise_image, widen

N = 24  # max new tokens


def _batch(tok, proc, cfg, rows=4):
    rng = np.random.default_rng(1)
    img = lambda: noise_image(rng)  # noqa: E731
    # different languages and image counts: prompts of different lengths, so left padding
    exs = [
        Example([img()], "en"),
        Example([img()], "zh"),
        Example([img(), img()], "en"),
        Example([img()], "en"),
    ]
    return collate(exs[:rows], tok, proc, cfg.image_tokens)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    tok = train_bpe(TEXTS, 400)
    cfg = get_preset("tiny")
    model = EchoVLM.from_config(cfg, tok, seed=0).eval()
    proc = make_image_processor(cfg.image_size)
    widen(model)  # so its tokens depend on the image and the text so far
    # Random weights almost never emit <|im_end|>: declare as "EOS" a token the model does emit,
    # chosen so that rows end at different steps (per-row stopping gets exercised).
    batch = _batch(tok, proc, cfg)
    plain = model.special
    seen = generate(model, batch, DecodeConfig(max_new_tokens=N)).tokens
    best = None
    for t in sorted({t for row in seen for t in row}):
        ends = [row.index(t) for row in seen if t in row]
        best = max(best or (0, 0, t), (len(set(ends)), -abs(len(ends) - 3), t))
    model.special = replace(plain, eos=best[2])
    return model, tok, proc, cfg, batch


def _hf_greedy(model, batch, n):
    ids, valid = batch.prompt_ids, batch.prompt_valid.long()
    kw = dict(
        input_ids=ids,
        attention_mask=valid,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.grid_thw,
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=model.special.eos,
        pad_token_id=model.special.pad,
    )
    with torch.no_grad():
        try:
            out = model.hf.generate(mm_token_type_ids=(ids == model.special.image).int(), **kw)
        except (TypeError, ValueError):  # older transformers derive image slots from input_ids
            out = model.hf.generate(**kw)
    rows = out[:, ids.shape[1] :].tolist()
    eos = model.special.eos
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


def _uncached(model, batch, n):
    """Greedy decoding with no cache: every step is a full forward over [prompt | generated]."""
    eos = model.special.eos
    rows, P = batch.prompt_ids.shape
    x_img = model.embed(batch.prompt_ids, batch.pixel_values, batch.grid_thw)
    pos_prompt = model.positions(batch.prompt_ids, batch.grid_thw, valid=batch.prompt_valid)
    next_pos = pos_prompt.amax(dim=(0, 2)) + 1
    gen = torch.empty(rows, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x_img, model.lm.embed_tokens(gen)], 1)
            pos = torch.cat([pos_prompt, text_positions(next_pos, 0, gen.shape[1])], 2)
            S = x.shape[1]
            valid = torch.cat([batch.prompt_valid, torch.ones(rows, S - P, dtype=torch.bool)], 1)
            mask = torch.ones(S, S, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
            mask |= torch.eye(S, dtype=torch.bool)  # padded queries see themselves only
            tok = model.logits(model(x, pos, mask))[:, -1].argmax(-1)
            gen = torch.cat([gen, tok[:, None]], 1)
            if all(eos in r for r in gen.tolist()):
                break
    return [r[: r.index(eos) + 1] if eos in r else r for r in gen.tolist()]


def test_greedy_equals_transformers_batch_of_one(tiny):
    model, tok, proc, cfg, _ = tiny
    batch = _batch(tok, proc, cfg, rows=1)
    ours = generate(model, batch, DecodeConfig(max_new_tokens=N)).tokens
    assert ours == _hf_greedy(model, batch, N)


def test_greedy_equals_transformers_ragged_batch(tiny):
    model, _, _, _, batch = tiny
    assert batch.prompt_valid.sum(1).unique().numel() > 1  # the prompts really are ragged
    ours = generate(model, batch, DecodeConfig(max_new_tokens=N)).tokens
    theirs = _hf_greedy(model, batch, N)
    assert ours == theirs


def test_cached_equals_uncached_and_static_equals_eager(tiny):
    model, _, _, _, batch = tiny
    dc = DecodeConfig(max_new_tokens=N)
    eager = generate(model, batch, dc, mode="eager").tokens
    assert eager == _uncached(model, batch, N)
    assert generate(model, batch, dc, mode="static").tokens == eager


def test_per_row_eos_and_forward_count(tiny):
    model, _, _, _, batch = tiny
    eos = model.special.eos
    out = generate(model, batch, DecodeConfig(max_new_tokens=N))
    ended = [len(r) for r in out.tokens if r[-1] == eos]
    assert len(set(ended)) >= 2  # rows stop at different steps
    assert all(r.count(eos) <= 1 for r in out.tokens)  # nothing after a row's EOS is returned
    longest = max(len(r) for r in out.tokens)
    # one forward per token after the first (which comes from the prefill); the loop stops
    # as soon as every row is done or at max_new_tokens
    assert out.forwards == longest - 1
    if all(r[-1] == eos for r in out.tokens):
        assert longest < N or out.forwards == N - 1


def test_max_new_tokens_caps_every_row(tiny):
    model, _, _, _, batch = tiny
    out = generate(model, batch, DecodeConfig(max_new_tokens=3))
    assert max(len(r) for r in out.tokens) <= 3 and out.forwards <= 2


def test_sampling_is_seeded_and_differs_from_greedy(tiny):
    model, _, _, _, batch = tiny
    dc = DecodeConfig(max_new_tokens=N, temperature=1.5, top_p=0.95, top_k=50, seed=3)
    a, b = generate(model, batch, dc).tokens, generate(model, batch, dc).tokens
    assert a == b
    assert generate(model, batch, replace(dc, seed=4)).tokens != a
    assert a != generate(model, batch, DecodeConfig(max_new_tokens=N)).tokens


@pytest.mark.gpu
def test_cuda_graph_and_compile_steps_equal_eager_on_gpu(tiny):
    model, _, _, _, batch = tiny
    model, batch = model.cuda(), batch.to("cuda")
    try:
        dc = DecodeConfig(max_new_tokens=N)
        eager = generate(model, batch, dc, mode="eager").tokens
        assert generate(model, batch, dc, mode="static").tokens == eager
        assert generate(model, batch, dc, mode="graph").tokens == eager
        assert generate(model, batch, dc, mode="compile").tokens == eager
    finally:
        model.cpu()
