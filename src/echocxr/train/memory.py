"""How much GPU memory full fine-tuning needs under FSDP2 (`echocxr train --fsdp`): an estimate.

Per GPU, with N GPUs, P parameters, mixed precision (bf16 compute, fp32 master weights, gradients
and AdamW moments, all fully sharded):

- master weights 4P/N, gradients 4P/N, AdamW moments 8P/N bytes;
- gathered bf16 copies while they compute: the root's (embeddings, head, final norm: unsharded for
  the whole step, since the root is the loss module) plus the larger of two decoder layers (the
  one computing and the one prefetched) and the vision tower (gathered whole for its forward);
- activations kept for backward: `activation_bytes_per_token_layer` per token per decoder layer,
  times the layers. With per-layer activation checkpointing only each layer's input (2H bytes per
  token) is kept, plus one layer's activations while it is recomputed;
- logits: our losses project only the supervised response positions; per position bf16 logits,
  their fp32 copy and its gradient (2 + 4 + 4 bytes per vocabulary entry).

Not counted: the CUDA context and allocator fragmentation (often 1-3 GB), communication buffers,
the vision tower's activations (frozen in RAD and DCD: computed without a graph), and the DCD
teacher's unsharded copy (an extra 4P bytes in fp32, 2P in bf16, on every GPU).

The activation count is measured, not taken from a paper: the bytes of the tensors autograd saves
in one `DecoderLayer` forward in bf16 (SDPA, no S x S matrix) fit 20H + 4K + 8F + 4D + 32 per token
(H hidden, K key/value width, F MLP width, D head width), exactly at five shapes;
tests/test_memory.py re-measures it. This module runs nothing on a GPU.

    python -m echocxr.train.memory --preset qwen2.5-vl-7b --gpus 8 --gpu-gib 80
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from echocxr.model.config import ModelConfig

GIB = 2**30
INSTRUCTION_TOKENS = 64  # text around the image tokens in the prompt (model/prompt.py), rounded up


def param_counts(cfg: ModelConfig, vocab: int | None = None) -> dict[str, int]:
    """Parameters of the Qwen2.5-VL architecture of `cfg` (vocab: the tokenizer's size if larger)."""
    V, H, F, L = max(vocab or 0, cfg.vocab_size), cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    K = cfg.num_kv_heads * cfg.head_dim
    attn = (H * H + H) + 2 * (H * K + K) + H * H  # q (bias), k and v (bias), o (no bias)
    layer = attn + 3 * H * F + 2 * H  # gate, up, down (no bias), two RMSNorms
    embed = V * H
    head = 0 if cfg.tie_word_embeddings else V * H
    language = embed + L * layer + H + head
    h, i = cfg.vision_hidden_size, cfg.vision_intermediate_size
    patch = 3 * cfg.temporal_patch_size * cfg.patch_size**2 * h
    block = 2 * h + (3 * h * h + 3 * h) + (h * h + h) + 2 * (h * i + i) + (i * h + h)
    m = h * cfg.spatial_merge_size**2
    merger = h + (m * m + m) + (m * H + H)
    vision = patch + cfg.vision_depth * block + merger
    return {
        "language": language,
        "layer": layer,
        "root": embed + head + H,  # what FSDP's root unit holds: embeddings, head, final norm
        "vision": vision,
        "total": language + vision,
    }


def activation_bytes_per_token_layer(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """Bytes autograd keeps per token for one decoder layer's backward (module docstring). Measured
    in bf16; the fp32 parts (RMSNorm's upcast) are already inside the constants."""
    H, F, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    K = cfg.num_kv_heads * D
    return (20 * H + 4 * K + 8 * F + 4 * D + 32) * bytes_per_value // 2


@dataclass(frozen=True)
class MemoryEstimate:
    gpus: int
    params: int
    seq_len: int  # tokens per row in the training layout
    supervised: int  # response positions with logits per row
    micro_batch: int  # rows per GPU per micro-batch
    master_weights_gib: float
    gradients_gib: float
    adam_gib: float
    gathered_bf16_gib: float
    activations_gib: float  # without activation checkpointing
    activations_checkpointed_gib: float
    logits_gib: float
    total_gib: float
    total_checkpointed_gib: float


def rad_seq_len(cfg: ModelConfig, images: int = 1) -> tuple[int, int]:
    """(tokens per row, supervised positions) of Stage 2's layout [prompt | noisy R | clean R]
    at the preset's image size and longest response (the longest of the three stages)."""
    prompt = images * cfg.image_tokens + INSTRUCTION_TOKENS
    return prompt + 2 * cfg.max_response_tokens, cfg.max_response_tokens


def estimate(
    cfg: ModelConfig,
    *,
    gpus: int = 8,
    micro_batch: int = 1,
    seq_len: int | None = None,
    supervised: int | None = None,
    vocab: int | None = None,
) -> MemoryEstimate:
    """Per-GPU memory of full fine-tuning `cfg` under FSDP2 on `gpus` GPUs (module docstring).
    seq_len / supervised default to the RAD layout (`rad_seq_len`). Raises ValueError for gpus < 1."""
    if gpus < 1 or micro_batch < 1:
        raise ValueError("gpus and micro_batch must be >= 1")
    default_seq, default_sup = rad_seq_len(cfg)
    S = seq_len or default_seq
    R = supervised if supervised is not None else default_sup
    n = param_counts(cfg, vocab)
    P, V = n["total"], max(vocab or 0, cfg.vocab_size)
    tokens = micro_batch * S
    act_layer = activation_bytes_per_token_layer(cfg) * tokens
    gathered = 2 * (n["root"] + max(2 * n["layer"], n["vision"]))
    parts = {
        "master_weights_gib": 4 * P / gpus / GIB,
        "gradients_gib": 4 * P / gpus / GIB,
        "adam_gib": 8 * P / gpus / GIB,
        "gathered_bf16_gib": gathered / GIB,
        "activations_gib": cfg.num_layers * act_layer / GIB,
        "activations_checkpointed_gib": (cfg.num_layers * 2 * cfg.hidden_size * tokens + act_layer) / GIB,
        "logits_gib": micro_batch * R * V * (2 + 4 + 4) / GIB,
    }
    fixed = sum(parts[k] for k in ("master_weights_gib", "gradients_gib", "adam_gib", "gathered_bf16_gib"))
    fixed += parts["logits_gib"]
    return MemoryEstimate(
        gpus=gpus,
        params=P,
        seq_len=S,
        supervised=R,
        micro_batch=micro_batch,
        **parts,
        total_gib=fixed + parts["activations_gib"],
        total_checkpointed_gib=fixed + parts["activations_checkpointed_gib"],
    )


def markdown(e: MemoryEstimate, gpu_gib: float) -> str:
    rows = [
        ("master weights (fp32, sharded)", e.master_weights_gib),
        ("gradients (fp32, sharded)", e.gradients_gib),
        ("AdamW moments (fp32, sharded)", e.adam_gib),
        ("gathered bf16 copies (root + 2 layers or vision)", e.gathered_bf16_gib),
        ("logits of supervised positions", e.logits_gib),
        ("activations, no checkpointing", e.activations_gib),
        ("activations, per-layer checkpointing", e.activations_checkpointed_gib),
        ("**total, no checkpointing**", e.total_gib),
        ("**total, with checkpointing**", e.total_checkpointed_gib),
    ]
    lines = ["| per GPU | GiB |", "|---|---:|"] + [f"| {k} | {v:.1f} |" for k, v in rows]
    fits = [
        f"{'fits' if t <= gpu_gib else 'does not fit'} in {gpu_gib:g} GiB"
        for t in (e.total_gib, e.total_checkpointed_gib)
    ]
    lines.append(f"\nWithout checkpointing it {fits[0]}; with checkpointing it {fits[1]}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from echocxr.model.config import get_preset

    p = argparse.ArgumentParser(prog="python -m echocxr.train.memory", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen2.5-vl-7b")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-gib", type=float, default=80.0)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=None, help="default: the RAD layout of the preset")
    args = p.parse_args(argv)
    e = estimate(get_preset(args.preset), gpus=args.gpus, micro_batch=args.micro_batch, seq_len=args.seq_len)
    print(json.dumps({"preset": args.preset, **asdict(e)}))
    print(markdown(e, args.gpu_gib))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
