"""The Qwen2.5-VL-compatible VLM: transformers' modules and weights, our forward.

transformers does what it does well: the configs, checkpoint loading and saving, the image
processor, the vision tower and patch merger. We own what block diffusion must control: the
M-RoPE positions, the attention masks, the KV cache and the decode step. Each of the language
model's decoder layers becomes a `DecoderLayer` module (same submodules, so the same parameter
names: checkpoints, peft LoRA targets and `save_pretrained`/`from_pretrained` are unchanged) whose
`forward(x, rope, mask, kv)` runs attention and MLP with an arbitrary boolean mask or a
FlexAttention block mask, optionally reading and writing a `KVCache`. `EchoVLM.forward` calls each
layer as a module, so per-layer hooks fire: FSDP2's `fully_shard` per layer, per-layer activation
checkpointing (`DecoderLayer.checkpoint`). tests/test_vlm.py checks that the logits match
`Qwen2_5_VLForConditionalGeneration` on the same weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from echocxr.errors import UserError
from echocxr.model.config import ModelConfig
from echocxr.model.kvcache import KVCache
from echocxr.model.layout import check_checkpoint, checkpoint_fields

ECHO_CONFIG = "echocxr.json"  # our config beside the HF files: preset fields, stage, block size


@dataclass(frozen=True)
class SpecialIds:
    eos: int  # <|im_end|>: ends the assistant turn (the report)
    pad: int
    mask: int  # the diffusion mask token
    image: int  # <|image_pad|>
    vision_start: int
    vision_end: int


_COMPILED_FLEX = None


def _flex_attention(cuda: bool):
    """FlexAttention only skips masked-out tiles when compiled; run eagerly it materialises every
    score. Inside an enclosing torch.compile the plain function is traced into that graph. On CPU
    (tests, float64) the eager reference runs."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if not cuda or torch.compiler.is_compiling():
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def mrope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor, section: tuple[int, ...], dtype):
    """M-RoPE: frequency slot j of the rotary half uses the t, h or w position by `section`.

    pos [3, B, S] -> cos, sin [B, S, head_dim].
    """
    freqs = pos[..., None].float() * inv_freq.float()  # [3, B, S, D/2]
    chunks = freqs.split(list(section), dim=-1)
    freqs = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def mrope_positions(
    input_ids: torch.Tensor,
    grid_thw: torch.Tensor | None,
    *,
    image_id: int,
    merge: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Qwen2.5-VL 3D positions for [B, S] ids: text counts up by one on all three axes; an image's
    tokens take (t, h, w) grid coordinates offset by the running position, which then advances by
    max(h, w). Padding (valid == False) gets position 0. Returns [3, B, S]."""
    B, S = input_ids.shape
    pos = torch.zeros(3, B, S, dtype=torch.long, device=input_ids.device)
    grids = iter(grid_thw.tolist() if grid_thw is not None else [])
    for b in range(B):
        ids = input_ids[b]
        keep = torch.ones(S, dtype=torch.bool, device=ids.device) if valid is None else valid[b]
        idx = keep.nonzero().flatten().tolist()
        toks = ids[keep].tolist()
        out, cur, i = [], 0, 0
        while i < len(toks):
            if toks[i] != image_id:
                out.append((cur, cur, cur))
                cur, i = cur + 1, i + 1
                continue
            t, h, w = next(grids)
            h, w = h // merge, w // merge
            for tt in range(t):
                for hh in range(h):
                    for ww in range(w):
                        out.append((cur + tt, cur + hh, cur + ww))
            i += t * h * w
            cur += max(h, w)
        pos[:, b, idx] = torch.tensor(out, dtype=torch.long, device=ids.device).T
    return pos


@dataclass(frozen=True)
class CacheView:
    """Where a forward reads and writes the KV cache: new keys go to slots start.. and queries
    attend to the first kv_len slots (None: start + the new tokens)."""

    cache: KVCache  # or decode.graphs.StaticKV: anything with write(layer, start, k, v, kv_len)
    start: int | torch.Tensor
    kv_len: int | None = None


class DecoderLayer(nn.Module):
    """One language-model block: x + attn(norm(x)), then + mlp(norm(x)) (Qwen2.5-VL's layer).

    It takes over the submodules of transformers' layer under the same names (`self_attn.q_proj`,
    `mlp.gate_proj`, `input_layernorm`, ...), so parameter names do not change. transformers' own
    forward (the reference in tests, `generate`) still calls the layers with its arguments; without
    `rope` the call is passed to transformers' layer, which shares these submodules.
    """

    def __init__(self, hf_layer: nn.Module, index: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.self_attn = hf_layer.self_attn
        self.mlp = hf_layer.mlp
        self.input_layernorm = hf_layer.input_layernorm
        self.post_attention_layernorm = hf_layer.post_attention_layernorm
        if hasattr(hf_layer, "attention_type"):  # read by some transformers versions' forward
            self.attention_type = hf_layer.attention_type
        self.index, self.n_heads, self.n_kv_heads, self.head_dim = index, n_heads, n_kv_heads, head_dim
        self.checkpoint = False  # recompute this layer's activations in backward (training only)
        self._hf = (hf_layer,)  # a tuple, so not a second registered copy of the same parameters

    def forward(self, x: torch.Tensor, rope=None, mask=None, kv: CacheView | None = None, **hf_kwargs):
        """x [B, S, D], rope = (cos, sin) [B, 1, S, head_dim], mask (None: causal; a bool tensor
        broadcastable to [B, 1, S, K], True = attend; or a FlexAttention BlockMask), kv: the cache
        to read and write -> [B, S, D]."""
        if rope is None:  # called by transformers' Qwen2_5_VLTextModel.forward
            return self._hf[0](x, **hf_kwargs)
        if self.checkpoint and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._block, x, rope, mask, kv, use_reentrant=False)
        return self._block(x, rope, mask, kv)

    def _block(self, x, rope, mask, kv):
        x = x + self._attention(self.input_layernorm(x), rope, mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _attention(self, x, rope, mask, kv):
        B, S, _ = x.shape
        a, (cos, sin) = self.self_attn, rope
        q = a.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, hd]
        k = a.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if kv is not None:
            k, v = kv.cache.write(self.index, kv.start, k, v, kv.kv_len)
        if mask is not None and not isinstance(mask, torch.Tensor):  # FlexAttention BlockMask
            o = _flex_attention(q.is_cuda)(q, k, v, block_mask=mask, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and kv is None, enable_gqa=True
            )
        return a.o_proj(o.transpose(1, 2).reshape(B, S, -1))


class EchoVLM(nn.Module):
    """Vision tower -> patch merger -> language model, with our attention and cache."""

    def __init__(self, hf: nn.Module, special: SpecialIds, config: ModelConfig | None = None):
        super().__init__()
        self.hf = hf  # Qwen2_5_VLForConditionalGeneration; owns every weight
        self.special = special
        self.config = config
        lm = hf.model.language_model
        self.n_heads = lm.config.num_attention_heads
        self.n_kv_heads = lm.config.num_key_value_heads
        self.head_dim = lm.config.hidden_size // self.n_heads
        rope = lm.rotary_emb
        section = getattr(rope, "mrope_section", None)
        if section is None:
            scaling = getattr(lm.config, "rope_scaling", None) or getattr(lm.config, "rope_parameters", {})
            section = scaling["mrope_section"]
        self.mrope_section = tuple(int(s) for s in section)
        self.merge = hf.config.vision_config.spatial_merge_size
        for i, layer in enumerate(lm.layers):
            if not isinstance(layer, DecoderLayer):
                lm.layers[i] = DecoderLayer(layer, i, self.n_heads, self.n_kv_heads, self.head_dim)

    # -- parts ---------------------------------------------------------------------------------
    @property
    def lm(self) -> nn.Module:
        return self.hf.model.language_model

    @property
    def visual(self) -> nn.Module:
        return self.hf.model.visual

    @property
    def n_layers(self) -> int:
        return len(self.lm.layers)

    @property
    def vocab_size(self) -> int:
        return self.hf.lm_head.out_features

    @property
    def device(self) -> torch.device:
        return self.hf.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.lm_head.weight.dtype

    # -- inputs --------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [N_patches, C*T*P*P], grid_thw [n_images, 3] -> merged features [N_tokens, D]."""
        out = self.visual(pixel_values.to(self.visual.dtype), grid_thw=grid_thw)
        return out.pooler_output if hasattr(out, "pooler_output") else out

    def embed(self, input_ids, pixel_values=None, grid_thw=None, image_features=None) -> torch.Tensor:
        """Token embeddings with image features scattered into the <|image_pad|> slots. [B, S, D]"""
        x = self.lm.embed_tokens(input_ids)
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values, grid_thw)
        if image_features is not None:
            slots = (input_ids == self.special.image)[..., None]
            if int(slots.sum()) != image_features.shape[0]:
                raise ValueError(
                    f"{int(slots.sum())} image slots but {image_features.shape[0]} image features"
                )
            x = x.masked_scatter(slots, image_features.to(x.dtype))
        return x

    def positions(self, input_ids, grid_thw=None, valid=None) -> torch.Tensor:
        return mrope_positions(
            input_ids, grid_thw, image_id=self.special.image, merge=self.merge, valid=valid
        )

    # -- the transformer -------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        mask=None,
        *,
        cache: KVCache | None = None,
        start: int | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """Decoder layers over embeddings x [B, S, D] at positions pos [3, B, S] -> hidden [B, S, D].

        mask: None (causal over x), a bool tensor broadcastable to [B, 1, S, K] (True = attend),
        or a FlexAttention BlockMask. With a cache, the new keys go to slots start.. (default
        cache.length) and queries attend to the first kv_len slots (default start + S).
        """
        cos, sin = mrope_cos_sin(pos, self.lm.rotary_emb.inv_freq, self.mrope_section, x.dtype)
        rope = (cos[:, None], sin[:, None])  # [B, 1, S, hd]
        kv = None
        if cache is not None:
            kv = CacheView(cache, cache.length if start is None else start, kv_len)
        for layer in self.lm.layers:
            x = layer(x, rope, mask, kv)
        return self.lm.norm(x)

    @property
    def layers(self) -> list[DecoderLayer]:
        return list(self.lm.layers)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hf.lm_head(hidden)

    # -- construction, saving, loading ------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: ModelConfig, tokenizer, *, dtype=torch.float32, seed: int = 0) -> EchoVLM:
        """Random-initialized model of a preset shape for a (trained or real) tokenizer."""
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        from echocxr.model.tokenizer import special_ids

        special = special_ids(tokenizer)
        vocab = max(cfg.vocab_size, len(tokenizer))
        hf_cfg = Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=vocab,
                hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads,
                max_position_embeddings=32768,
                rms_norm_eps=cfg.rms_norm_eps,
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": cfg.rope_theta,
                    "mrope_section": list(cfg.mrope_section),
                },
                bos_token_id=special.pad,
                eos_token_id=special.eos,
                pad_token_id=special.pad,
            ),
            vision_config=dict(
                depth=cfg.vision_depth,
                hidden_size=cfg.vision_hidden_size,
                intermediate_size=cfg.vision_intermediate_size,
                num_heads=cfg.vision_heads,
                out_hidden_size=cfg.hidden_size,
                patch_size=cfg.patch_size,
                spatial_merge_size=cfg.spatial_merge_size,
                temporal_patch_size=cfg.temporal_patch_size,
                window_size=cfg.window_size,
                fullatt_block_indexes=list(cfg.fullatt_block_indexes),
            ),
            image_token_id=special.image,
            video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=special.vision_start,
            vision_end_token_id=special.vision_end,
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
        hf_cfg._attn_implementation = "sdpa"
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            hf = Qwen2_5_VLForConditionalGeneration(hf_cfg)
        hf.generation_config.eos_token_id = special.eos
        hf.generation_config.pad_token_id = special.pad
        return cls(hf.to(dtype), special, cfg)

    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        tokenizer=None,
        processor=None,
        extra: dict | None = None,
        state_dict: dict | None = None,
    ):
        """HF layout (safetensors shards <= 15 MB, config, tokenizer, processor) plus echocxr.json
        (the preset, `extra`, and the sequence layout's fields: `layout.checkpoint_fields`).
        state_dict: the weights to write instead of this module's, under `self.hf`'s names (a
        sharded model's gathered full weights)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(out, max_shard_size="15MB", safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        if processor is not None:
            processor.save_pretrained(out)
        meta = {
            "model": self.config.to_dict() if self.config else None,
            **(extra or {}),
            **checkpoint_fields(),
        }
        tmp = out / (ECHO_CONFIG + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, out / ECHO_CONFIG)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=None, device="cpu"):
        """Load a local checkpoint directory in HF layout. Returns (model, tokenizer, processor, meta).

        With echocxr.json, its token shift must be the one this code reads logits with
        (`layout.check_checkpoint`; UserError otherwise). A folder without it is a plain Qwen2.5-VL
        checkpoint (e.g. Lingshu-7B): a causal LM whose head predicts the next token, which is
        the shift by definition."""
        from transformers import AutoConfig, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        from echocxr.model.image_processing import REAL_IMAGE_SIZE, load_image_processor, processed_side
        from echocxr.model.tokenizer import ensure_mask_token, special_ids

        path = Path(path)
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: not a checkpoint directory (no config.json)")
        try:
            hf_cfg = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}/config.json: cannot read the config ({e})") from None
        if hf_cfg.model_type != "qwen2_5_vl":
            raise UserError(f"{path}: architecture {hf_cfg.model_type!r} is not supported; need qwen2_5_vl")
        meta = {}
        if (path / ECHO_CONFIG).is_file():
            try:
                meta = json.loads((path / ECHO_CONFIG).read_text())
            except ValueError as e:
                raise UserError(f"{path / ECHO_CONFIG}: not valid JSON ({e})") from None
            check_checkpoint(meta, path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        ensure_mask_token(tokenizer)
        hf_cfg._attn_implementation = "sdpa"
        try:
            hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                path, config=hf_cfg, dtype=dtype or "auto"
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"{path}: cannot load the weights ({e})") from None
        # grown only: a padded vocabulary (Qwen2.5-VL: 152064 rows for 151665 ids) has a row for
        # the mask token already, and shrinking it would copy the embedding and head (2.2 GB at 7B)
        if hf.get_input_embeddings().num_embeddings < len(tokenizer):
            hf.resize_token_embeddings(len(tokenizer))
        if meta.get("model"):
            cfg = ModelConfig.from_dict(meta["model"])
            processor = load_image_processor(path, cfg)
        else:  # a plain folder: its own shape, at the side its processor makes of a REAL_IMAGE_SIZE square
            processor = load_image_processor(path)
            side = processed_side(processor, REAL_IMAGE_SIZE)
            cfg = ModelConfig.from_hf(hf.config, path.name, side)
        model = cls(hf.to(device), special_ids(tokenizer), cfg)
        return model, tokenizer, processor, meta
