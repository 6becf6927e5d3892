"""`eval.commits`: per-step commit records of the block decoder, against its own trajectory."""

import numpy as np
import pytest

from echocxr.batch import Example, collate
from echocxr.eval.commits import analyse_batch, summarize
from echocxr.model.config import get_preset
from echocxr.model.denoise import CachedContext, banned_tokens, denoise_blocks
from echocxr.model.image_processing import make_image_processor
from echocxr.model.tokenizer import train_bpe
from echocxr.model.vlm import EchoVLM
from helpers import REPORTS, noise_image, widen


@pytest.fixture(scope="module")
def tiny():
    tok = train_bpe(REPORTS, 400)
    cfg = get_preset("tiny")
    model = EchoVLM.from_config(cfg, tok, seed=0).eval()
    widen(model)
    return model, tok, make_image_processor(cfg.image_size), cfg


def _batch(tiny, seed):
    model, tok, proc, cfg = tiny
    rng = np.random.default_rng(seed)
    exs = [Example([noise_image(rng)], lang, None, f"s{i}") for i, lang in enumerate(["en", "en", "zh"])]
    return collate(exs, tok, proc, cfg.image_tokens)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_each_position_up_to_eos_is_recorded_once_at_the_step_the_decoder_committed_it(tiny, steps):
    model, tok, _, _ = tiny
    own, blind = _batch(tiny, 0), _batch(tiny, 1)
    banned = banned_tokens(model, tok)
    kw = dict(block=4, steps=steps, max_new_tokens=16, strategy="confidence_dynamic", threshold=0.85)
    commits, tokens = analyse_batch(model, own, blind, banned=banned, **kw)
    ref = denoise_blocks(
        model, CachedContext(model, own, 16, 4), own.size, record_top_k=4, banned=banned, **kw
    )
    assert tokens == ref.tokens  # the paired context decodes exactly as the plain one
    expected = {}
    for r, blocks in enumerate(ref.trajectory):
        for b, block_steps in enumerate(blocks):
            for s, rec in enumerate(block_steps):
                for j, t, c in zip(rec.positions, rec.tokens, rec.confidence, strict=True):
                    if b * 4 + j <= len(ref.tokens[r]) - 1:
                        expected[(r, b, j)] = (s, t, c)
    got = {(c.row, c.block, c.offset): (c.step, c.token, float(np.exp(c.own))) for c in commits}
    assert got.keys() == expected.keys()
    for key, (s, t, conf) in expected.items():
        assert got[key][:2] == (s, t)
        assert got[key][2] == pytest.approx(conf, rel=1e-4, abs=1e-6)
    assert len(commits) == sum(len(t) for t in tokens)


def test_same_images_give_zero_image_dependence(tiny):
    model, tok, _, _ = tiny
    own = _batch(tiny, 0)
    commits, _ = analyse_batch(
        model,
        own,
        own,
        block=4,
        steps=4,
        strategy="confidence_dynamic",
        threshold=0.85,
        max_new_tokens=12,
        banned=banned_tokens(model, tok),
    )
    s = summarize(commits, tok)
    assert s["overall"]["image_dependence"] == pytest.approx(0.0, abs=1e-5)
    assert s["overall"]["blank_agrees"] == 1.0
    assert sum(r["share"] for r in s["per_step"]) == pytest.approx(1.0)
    other = analyse_batch(
        model,
        own,
        _batch(tiny, 1),
        block=4,
        steps=4,
        strategy="confidence_dynamic",
        threshold=0.85,
        max_new_tokens=12,
        banned=banned_tokens(model, tok),
    )[0]
    assert any(abs(c.own - c.blank) > 1e-4 for c in other)  # other images do move the tokens
