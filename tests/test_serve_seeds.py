"""Per-row sampling generators (issue #22 item 3), the engine side of the server's `seed`: a seeded
row's tokens at temperature > 0 are those of the same row decoded alone with that seed, whatever
else is in its batch and whichever rows finish early; different seeds give different tokens."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from echocxr.batch import Example, collate
from echocxr.decode.config import DecodeConfig
from echocxr.decode.engine import Engine
from echocxr.errors import UserError
from echocxr.model.config import get_preset
from echocxr.model.denoise import row_generators, sample
from echocxr.model.image_processing import make_image_processor
from echocxr.model.tokenizer import train_bpe
from echocxr.model.vlm import EchoVLM
from helpers import REPORTS, noise_image, widen

N = 12
SAMPLED = dict(max_new_tokens=N, temperature=1.0, top_k=50, top_p=0.95)
CONFIGS = {
    "ar": DecodeConfig(decoder="ar", **SAMPLED),
    "block": DecodeConfig(decoder="block", block_size=4, steps=2, **SAMPLED),
    "block-sequential": DecodeConfig(
        decoder="block", block_size=4, steps=4, strategy="sequential", **SAMPLED
    ),
    "onestep": DecodeConfig(decoder="onestep", block_size=4, **SAMPLED),
}


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    tok = train_bpe(REPORTS, 300)
    cfg = get_preset("tiny")
    model = widen(EchoVLM.from_config(cfg, tok, seed=0).eval())
    rng = np.random.default_rng(5)
    ims = [noise_image(rng) for _ in range(4)]
    exs = [Example([im], "en") for im in ims]
    proc = make_image_processor(cfg.image_size)
    batch = lambda rows: collate([exs[i] for i in rows], tok, proc, cfg.image_tokens)  # noqa: E731
    return model, batch


@pytest.mark.parametrize("decoder", sorted(CONFIGS))
def test_a_seeded_row_in_a_batch_equals_it_alone(tiny, decoder):
    model, batch = tiny
    engine = Engine(model, CONFIGS[decoder], device="cpu")
    seeds, caps = [11, 12, 11, 13], [N, 3, N, 5]  # two early finishers leave the batch
    together = engine.generate(batch([0, 1, 2, 3]), seeds=seeds, max_new_tokens_per_row=caps).tokens
    for r in range(4):
        alone = engine.generate(batch([r]), seeds=[seeds[r]], max_new_tokens_per_row=[caps[r]]).tokens
        assert alone[0] == together[r], (decoder, r)
    # the same image twice with the same seed in one batch: the same tokens; another seed differs
    twins = engine.generate(batch([0, 0, 0]), seeds=[7, 7, 8]).tokens
    assert twins[0] == twins[1] and twins[0] != twins[2]


def test_cfg_seed_is_every_rows_seed_and_the_range_is_checked(tiny):
    model, batch = tiny
    engine = Engine(model, CONFIGS["onestep"], device="cpu")
    cfg = replace(CONFIGS["onestep"], seed=21)
    assert engine.generate(batch([0, 1]), cfg).tokens == engine.generate(batch([0, 1]), seeds=[21, 21]).tokens
    for bad in ([2**64, 0], [-(2**63) - 1, 0], [1]):
        with pytest.raises(UserError, match="seeds"):
            engine.generate(batch([0, 1]), seeds=bad)


def test_rows_without_a_generator_draw_nothing():
    """A None entry takes the row's argmax and leaves every other row's draws as they were."""
    logits = torch.randn(3, 4, 50)
    a = sample(logits, 1.0, generator=row_generators([1, 2, 3], "cpu"))[0]
    b = sample(logits, 1.0, generator=[None, *row_generators([2, 3], "cpu")])[0]
    assert torch.equal(a[1:], b[1:]) and torch.equal(b[0], logits[0].argmax(-1))
    with pytest.raises(ValueError, match="outside"):
        row_generators([2**64], "cpu")
