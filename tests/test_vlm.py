"""Our VLM forward against transformers' Qwen2.5-VL on the same tiny random weights."""

import numpy as np
import pytest
import torch
from PIL import Image

from echocxr.model.config import get_preset
from echocxr.model.image_processing import make_image_processor, preprocess
from echocxr.model.kvcache import KVCache
from echocxr.model.masks import decode_causal
from echocxr.model.prompt import prompt_ids, response_ids
from echocxr.model.tokenizer import train_bpe
from echocxr.model.vlm import EchoVLM
from helpers import REPORTS as TEXTS


@pytest.fixture(scope="module")
def tiny():
    tok = train_bpe(TEXTS, 400)
    cfg = get_preset("tiny")
    model = EchoVLM.from_config(cfg, tok, seed=0).eval()
    proc = make_image_processor(cfg.image_size)
    return model, tok, proc, cfg


def _batch(tok, proc, cfg, n=2):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (80, 80), dtype=np.uint8)) for _ in range(n)]
    pv, thw = preprocess(proc, imgs)
    ids = prompt_ids(tok, 1, cfg.image_tokens, "en") + response_ids(tok, TEXTS[1])[:7]
    return torch.tensor([ids] * n), pv, thw


def test_image_tokens_match_processor(tiny):
    model, tok, proc, cfg = tiny
    _, pv, thw = _batch(tok, proc, cfg, 1)
    assert int(thw.prod(-1).item()) // cfg.spatial_merge_size**2 == cfg.image_tokens


def test_positions_match_transformers(tiny):
    model, tok, proc, cfg = tiny
    ids, pv, thw = _batch(tok, proc, cfg)
    ours = model.positions(ids, thw)
    mm = (ids == model.special.image).int()
    try:
        theirs, _ = model.hf.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=thw)
    except TypeError:  # older transformers: no mm_token_type_ids
        theirs, _ = model.hf.model.get_rope_index(ids, image_grid_thw=thw)
    assert torch.equal(ours, theirs)


def test_logits_match_transformers(tiny):
    model, tok, proc, cfg = tiny
    ids, pv, thw = _batch(tok, proc, cfg)
    with torch.no_grad():
        kw = {"mm_token_type_ids": (ids == model.special.image).int()}
        try:
            ref = model.hf(input_ids=ids, pixel_values=pv, image_grid_thw=thw, **kw).logits
        except TypeError:  # older transformers derive the image positions from input_ids alone
            ref = model.hf(input_ids=ids, pixel_values=pv, image_grid_thw=thw).logits
        x = model.embed(ids, pv, thw)
        ours = model.logits(model(x, model.positions(ids, thw)))
    # float32 on CPU: the two paths differ only in op order
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_cached_prefill_then_step_equals_full_forward(tiny):
    model, tok, proc, cfg = tiny
    ids, pv, thw = _batch(tok, proc, cfg)
    S = ids.shape[1]
    with torch.no_grad():
        x = model.embed(ids, pv, thw)
        pos = model.positions(ids, thw)
        full = model.logits(model(x, pos))
        cache = KVCache.allocate(
            model.n_layers, 2, model.n_kv_heads, model.head_dim, S + 4, dtype=x.dtype, device="cpu"
        )
        pre = model.logits(model(x[:, :-3], pos[:, :, :-3], decode_causal(0, S - 3), cache=cache))
        cache.commit(S - 3)
        step = model.logits(model(x[:, -3:], pos[:, :, -3:], decode_causal(S - 3, 3), cache=cache))
    torch.testing.assert_close(pre, full[:, :-3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step, full[:, -3:], atol=1e-5, rtol=1e-5)


def test_save_and_load_roundtrip(tiny, tmp_path):
    model, tok, proc, cfg = tiny
    model.save_pretrained(tmp_path / "ckpt", tok, proc, extra={"stage": "ar"})
    loaded, tok2, proc2, meta = EchoVLM.from_pretrained(tmp_path / "ckpt")
    assert meta["stage"] == "ar" and loaded.config == cfg
    ids, pv, thw = _batch(tok, proc, cfg)
    with torch.no_grad():
        a = model.logits(model(model.embed(ids, pv, thw), model.positions(ids, thw)))
        pv2, thw2 = preprocess(proc2, [Image.fromarray(np.zeros((80, 80), np.uint8))] * 2)
        assert torch.equal(thw2, thw)
        b = loaded.logits(loaded(loaded.embed(ids, pv, thw), loaded.positions(ids, thw)))
    torch.testing.assert_close(a, b)


def test_load_errors_are_clear(tmp_path):
    from echocxr.errors import UserError

    with pytest.raises(UserError, match="no config.json"):
        EchoVLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError):
        EchoVLM.from_pretrained(tmp_path)


def test_decoder_layers_keep_transformers_names_and_are_called_as_modules(tiny):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from echocxr.model.vlm import DecoderLayer

    model, tok, proc, cfg = tiny
    plain = Qwen2_5_VLForConditionalGeneration(model.hf.config)
    assert list(model.hf.state_dict()) == list(plain.state_dict())  # checkpoints, LoRA targets
    assert all(isinstance(layer, DecoderLayer) for layer in model.lm.layers)
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: calls.append(m.index)) for layer in model.layers]
    ids, pv, thw = _batch(tok, proc, cfg)
    with torch.no_grad():
        model(model.embed(ids, pv, thw), model.positions(ids, thw))
    for h in hooks:
        h.remove()
    assert calls == list(range(cfg.num_layers))  # the per-layer hooks FSDP2 relies on fire, in order


def test_activation_checkpointing_gives_the_same_gradients(tiny):
    model, tok, proc, cfg = tiny
    ids, pv, thw = _batch(tok, proc, cfg)
    model.train()

    runs = []  # MLP forwards of layer 0: once, or again in backward when recomputed
    hook = model.layers[0].mlp.register_forward_pre_hook(lambda m, a: runs.append(1))

    def grads(checkpoint: bool):
        for layer in model.layers:
            layer.checkpoint = checkpoint
        model.zero_grad(set_to_none=True)
        runs.clear()
        x = model.embed(ids, pv, thw)
        model.logits(model(x, model.positions(ids, thw))).float().square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(runs)

    try:
        (plain, n_plain), (ckpt, n_ckpt) = grads(False), grads(True)
    finally:
        hook.remove()
        for layer in model.layers:
            layer.checkpoint = False
        model.zero_grad(set_to_none=True)
        model.eval()
    assert (n_plain, n_ckpt) == (1, 2)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], msg=n)
