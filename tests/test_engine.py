"""The long-lived decode engine (issue #15 item 4): buffers reused across calls, commit events,
batch invariance at temperature 0, per-row caps, and DecodeConfig built from checkpoint metadata."""

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
from echocxr.model.image_processing import make_image_processor
from echocxr.model.tokenizer import train_bpe
from echocxr.model.vlm import EchoVLM
from helpers import noise_image, widen

TEXTS = [
    "Findings: The heart is normal in size. No pleural effusion. No pneumothorax.\nImpression: Normal chest.",
    "Findings: Mild cardiomegaly. Small left pleural effusion.\nImpression: Cardiomegaly with effusion.",
] * 10
N = 8  # max new tokens: short, so the module stays within its time budget

CONFIGS = {
    "ar": DecodeConfig(decoder="ar", max_new_tokens=N),
    "block": DecodeConfig(decoder="block", block_size=4, steps=2, max_new_tokens=N),
    "onestep": DecodeConfig(decoder="onestep", block_size=4, max_new_tokens=N),
}


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)  # steadier on a shared 2-core box
    tok = train_bpe(TEXTS, 300)
    cfg = get_preset("tiny")
    model = EchoVLM.from_config(cfg, tok, seed=0).eval()
    # A wider init than the default so the tokens depend on the image (batch invariance would
    # hold trivially for a model that ignores its input).
    widen(model)
    rng = np.random.default_rng(3)
    ims = [noise_image(rng) for _ in range(5)]
    # different languages and image counts: left padding differs between a row alone and in a batch
    exs = [
        Example([ims[0]], "en"),
        Example([ims[1]], "zh"),
        Example([ims[2], ims[3]], "en"),
        Example([ims[4]], "en"),
    ]
    proc = make_image_processor(cfg.image_size)
    batch = lambda rows: collate([exs[i] for i in rows], tok, proc, cfg.image_tokens)  # noqa: E731
    return model, tok, batch


def test_repeated_calls_reuse_the_cache_and_steps(tiny):
    model, _, batch = tiny
    # the static step: the fixed-shape step that CUDA graphs replay, over the whole capacity
    engine = Engine(model, CONFIGS["onestep"], device="cpu", mode="static")
    a, b = batch([0, 1, 2, 3]), batch([3, 2, 1, 0])
    first = engine.generate(a).tokens
    cache, steps = engine.caches[4], dict(engine.steps)
    ptrs = (cache.k.data_ptr(), cache.v.data_ptr(), cache.key_valid.data_ptr())
    for dc in CONFIGS.values():  # every decoder runs over the same buffers
        engine.generate(b, dc)
    again = engine.generate(a).tokens
    assert engine.allocations == 1 and engine.caches[4] is cache
    assert (cache.k.data_ptr(), cache.v.data_ptr(), cache.key_valid.data_ptr()) == ptrs
    assert all(engine.steps[k] is s for k, s in steps.items())
    assert again == first  # nothing left over from the calls in between changes the result


@pytest.mark.parametrize("decoder", sorted(CONFIGS))
def test_commit_events_concatenate_to_the_output(tiny, decoder):
    model, _, batch = tiny
    events = []
    out = Engine(model, device="cpu").generate(batch([0, 1, 2, 3]), CONFIGS[decoder], events.append)
    got, finished = [[] for _ in range(4)], [False] * 4
    for e in events:
        assert len(e.rows) == len(e.tokens) == len(e.finished) == len(e.totals) and e.rows
        for r, toks, fin, total in zip(e.rows, e.tokens, e.finished, e.totals, strict=True):
            assert not finished[r] and toks  # a finished row emits nothing more
            got[r] += toks
            finished[r] = fin
            assert total == got[r]  # the whole output so far: a finished row is answerable at once
        assert e.prefill_ms == out.stats["prefill_s"] * 1e3 > 0
    assert got == out.tokens and all(finished)
    assert [e.forwards for e in events] == sorted(e.forwards for e in events)
    assert events[-1].forwards == out.forwards
    assert all(b.elapsed_ms >= a.elapsed_ms > 0 for a, b in zip(events, events[1:], strict=False))
    per_commit = 1 if decoder == "ar" else 4
    assert all(len(t) <= per_commit for e in events for t in e.tokens)


@pytest.mark.parametrize("decoder", sorted(CONFIGS))
def test_a_row_alone_equals_the_same_row_in_a_batch(tiny, decoder):
    model, _, batch = tiny
    engine = Engine(model, CONFIGS[decoder], device="cpu")
    together = engine.generate(batch([0, 1, 2, 3])).tokens
    assert len({tuple(t) for t in together}) > 1  # the rows really differ
    # row 1 (zh, a shorter prompt) is left-padded in the batch and not alone
    assert engine.generate(batch([1])).tokens[0] == together[1]


@pytest.mark.parametrize("decoder", sorted(CONFIGS))
def test_per_row_max_new_tokens(tiny, decoder):
    model, _, batch = tiny
    engine = Engine(model, CONFIGS[decoder], device="cpu")
    b = batch([0, 1, 2, 3])
    full = engine.generate(b).tokens
    caps = [3, N, 5, 1]
    capped = engine.generate(b, max_new_tokens_per_row=caps).tokens
    assert capped == [f[:c] for f, c in zip(full, caps, strict=True)]
    with pytest.raises(UserError, match="max_new_tokens_per_row"):
        engine.generate(b, max_new_tokens_per_row=[3, 3])


@pytest.mark.parametrize("decoder", [*sorted(CONFIGS), "onestep-vanilla"])
def test_finished_rows_leave_the_batch_with_the_same_tokens(tiny, decoder):
    """Compaction (finished rows leave the cache and the step) against the full-batch path at
    temperature 0: the same tokens, commit events and forwards, fewer rows computed."""
    model, _, batch = tiny
    cfg = CONFIGS["onestep"] if decoder == "onestep-vanilla" else CONFIGS[decoder]
    cfg = replace(cfg, fused=False) if decoder == "onestep-vanilla" else cfg
    b, caps = batch([0, 1, 2, 3]), [3, N, 5, 1]
    runs = {}
    for compact, mode in ((False, "eager"), (True, "eager"), (True, "static")):
        events = []
        engine = Engine(model, cfg, device="cpu", compact=compact, mode=mode)
        out = engine.generate(b, on_commit=events.append, max_new_tokens_per_row=caps)
        runs[compact, mode] = (out, [(e.rows, e.tokens, e.finished, e.forwards) for e in events])
    (full, full_ev), (compacted, compact_ev) = runs[False, "eager"], runs[True, "eager"]
    assert compacted.tokens == full.tokens and compacted.forwards == full.forwards
    assert compact_ev == full_ev and runs[True, "static"][1] == full_ev  # the fixed-shape step too
    assert full.stats["row_forwards"] == 4 * full.forwards
    assert compacted.stats["row_forwards"] < full.stats["row_forwards"]  # the short rows left


def test_decode_config_from_checkpoint_metadata():
    preset = get_preset("tiny")
    dc = DecodeConfig.from_checkpoint({"stage": "dcd", "block_size": 4}, preset)
    assert (dc.decoder, dc.block_size, dc.steps, dc.max_new_tokens) == (
        "onestep",
        4,
        4,
        preset.max_response_tokens,
    )
    dc = DecodeConfig.from_checkpoint({"stage": "rad", "block_size": 16}, None, steps=4, temperature=None)
    assert (dc.decoder, dc.block_size, dc.steps, dc.temperature) == ("block", 16, 4, 0.0)
    assert DecodeConfig.from_checkpoint({}, None) == DecodeConfig()
    assert DecodeConfig.from_checkpoint({"stage": "ar"}, None, decoder="onestep").decoder == "onestep"
    with pytest.raises(UserError, match="unknown decode setting"):
        DecodeConfig.from_checkpoint({}, None, blocksize=4)
    with pytest.raises(UserError, match="steps must be"):
        replace(DecodeConfig(decoder="block", block_size=4), steps=5)


@pytest.mark.gpu
def test_graph_steps_equal_eager_and_are_captured_once_on_gpu(tiny):
    model, _, batch = tiny
    model.cuda()
    try:
        a, b = batch([0, 1, 2, 3]), batch([3, 2, 1, 0])
        for dc in CONFIGS.values():
            eager = Engine(model, dc, device="cuda", mode="eager")
            graph = Engine(model, dc, device="cuda", mode="graph")
            assert graph.generate(a).tokens == eager.generate(a).tokens
            captured = {k: dict(s.fast.graphs) for k, s in graph.steps.items()}
            allocated = graph.allocations  # 1, plus one per smaller row count rows left down to
            assert graph.generate(b).tokens == eager.generate(b).tokens
            assert graph.allocations == allocated
            for k, s in graph.steps.items():  # the second call replayed the first call's graphs
                assert all(s.fast.graphs[shape] is g for shape, g in captured[k].items())
    finally:
        model.cpu()
