"""The FSDP2 memory estimate (train/memory.py): parameter counts equal the built model's, the
activation formula equals the bytes autograd really saves in a DecoderLayer, and the 7B table adds up."""

from dataclasses import replace

import pytest
import torch

from echocxr.model.config import get_preset
from echocxr.model.tokenizer import train_bpe
from echocxr.model.vlm import EchoVLM, mrope_cos_sin
from echocxr.train import memory


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["Findings: normal heart. No effusion.", "Impression: normal chest."] * 10, 300)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_param_counts_equal_the_built_model(tok, preset):
    cfg = get_preset(preset)
    model = EchoVLM.from_config(cfg, tok)
    n = memory.param_counts(cfg, vocab=len(tok))
    assert n["total"] == sum(p.numel() for p in model.parameters())
    assert n["vision"] == sum(p.numel() for p in model.visual.parameters())
    assert n["layer"] == sum(p.numel() for p in model.layers[0].parameters())


@pytest.mark.parametrize(("hidden", "inter", "heads", "kv_heads"), [(64, 128, 4, 2), (96, 256, 3, 1)])
def test_activation_formula_equals_saved_tensor_bytes(tok, hidden, inter, heads, kv_heads):
    cfg = replace(
        get_preset("tiny"),
        hidden_size=hidden,
        intermediate_size=inter,
        num_heads=heads,
        num_kv_heads=kv_heads,
        mrope_section=(4, 6, 6) if hidden // heads == 32 else (2, 3, 3),
        num_layers=1,
    )
    model = EchoVLM.from_config(cfg, tok, dtype=torch.bfloat16).train()
    S = 32
    x = torch.randn(1, S, hidden, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(S)[None, None].expand(3, 1, S)
    cos, sin = mrope_cos_sin(pos, model.lm.rotary_emb.inv_freq, model.mrope_section, x.dtype)
    saved = {}  # storage -> bytes: views of one tensor count once

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](x, (cos[:, None], sin[:, None]), None, None)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    measured = sum(b for ptr, b in saved.items() if ptr not in skip) / S
    assert measured == pytest.approx(memory.activation_bytes_per_token_layer(cfg), rel=0.03)


def test_7b_on_8_gpus_adds_up():
    cfg = get_preset("qwen2.5-vl-7b")
    e = memory.estimate(cfg, gpus=8)
    assert 8.0e9 < e.params < 8.6e9  # Qwen2.5-VL-7B: 8.29B with the vision tower
    assert e.master_weights_gib == pytest.approx(4 * e.params / 8 / 2**30)
    assert e.adam_gib == pytest.approx(2 * e.gradients_gib)
    parts = e.master_weights_gib + e.gradients_gib + e.adam_gib + e.gathered_bf16_gib + e.logits_gib
    assert e.total_gib == pytest.approx(parts + e.activations_gib)
    assert e.total_checkpointed_gib == pytest.approx(parts + e.activations_checkpointed_gib)
    assert e.activations_checkpointed_gib < e.activations_gib / 5
    assert memory.estimate(cfg, gpus=16).adam_gib == pytest.approx(e.adam_gib / 2)
    assert e.seq_len == cfg.image_tokens + memory.INSTRUCTION_TOKENS + 2 * cfg.max_response_tokens
    with pytest.raises(ValueError):
        memory.estimate(cfg, gpus=0)
