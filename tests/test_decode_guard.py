"""The decoding guard (issue #14 item 6): no decoder samples or commits the mask token or a
special token other than EOS, even when the model prefers them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import echocxr.decode.common as common
from echocxr.batch import Example, collate
from echocxr.decode import engine
from echocxr.decode.api import DecodeConfig, generate
from echocxr.model.config import get_preset
from echocxr.model.image_processing import make_image_processor
from echocxr.model.tokenizer import train_bpe
from echocxr.model.vlm import EchoVLM
from helpers import noise_image, prefer_banned

TEXTS = ["Findings: The heart is normal in size. No pleural effusion.\nImpression: Normal chest."] * 20

DECODERS = [
    DecodeConfig(decoder="ar"),
    DecodeConfig(decoder="block", block_size=4, steps=2),
    DecodeConfig(decoder="onestep", block_size=4, fused=True),
    DecodeConfig(decoder="onestep", block_size=4, fused=False),
]


@pytest.fixture(scope="module")
def biased():
    """A tiny model whose logits favour the mask token most, then pad and image (the issue's
    reproduction: a mask logit bias), so an unguarded decoder emits them."""
    torch.set_num_threads(1)  # steadier on a shared 2-core box
    tok = train_bpe(TEXTS, 300)
    cfg = get_preset("tiny")
    model = prefer_banned(EchoVLM.from_config(cfg, tok, seed=0).eval())
    rng = np.random.default_rng(0)
    img = lambda: noise_image(rng)  # noqa: E731
    batch = collate(
        [Example([img()], "en"), Example([img()], "zh")],
        tok,
        make_image_processor(cfg.image_size),
        cfg.image_tokens,
    )
    return model, tok, batch


def _banned_ids(model) -> set[int]:
    s = model.special
    return {s.mask, s.pad, s.image, s.vision_start, s.vision_end}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("dc", DECODERS, ids=lambda d: f"{d.decoder}{'' if d.fused else '-vanilla'}")
def test_no_decoder_emits_mask_or_special_tokens(biased, dc, temperature):
    from dataclasses import replace

    model, _, batch = biased
    out = generate(model, batch, replace(dc, max_new_tokens=6, temperature=temperature, seed=1))
    emitted = {t for row in out.tokens for t in row}
    assert emitted and not emitted & _banned_ids(model)


def test_without_the_guard_the_mask_token_is_emitted(biased, monkeypatch):
    """The reproduction itself: the test above could not pass by accident."""
    model, _, batch = biased
    none = lambda m, tokenizer=None: torch.zeros(m.vocab_size, dtype=torch.bool)  # noqa: E731
    monkeypatch.setattr(engine, "banned_tokens", none)
    for dc in DECODERS:
        from dataclasses import replace

        out = generate(model, batch, replace(dc, max_new_tokens=4))
        assert model.special.mask in out.tokens[0], dc.decoder


def test_banned_set_with_a_tokenizer(biased):
    model, tok, _ = biased
    banned = common.banned_tokens(model, tok)
    assert not banned[model.special.eos]
    assert banned[model.special.mask] and banned[tok.convert_tokens_to_ids("<|im_start|>")]
    assert banned[len(tok) :].all() and not banned[: len(tok)].all()


def test_text_refuses_a_banned_token_instead_of_dropping_it(biased):
    model, tok, _ = biased
    eng = engine.Engine(model, device="cpu", tokenizer=tok)
    word = tok.convert_tokens_to_ids("Fin")
    assert eng.text([word, model.special.eos]) == "Fin"
    with pytest.raises(RuntimeError, match=str(model.special.mask)):
        eng.text([word, model.special.mask, model.special.eos])
