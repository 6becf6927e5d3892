"""Typed model presets. One source of defaults: every preset is a `ModelConfig` built here.

`tiny` runs CI on CPU in seconds; `small` (~20M parameters) runs the whole AR -> RAD -> DCD chain
inside one 10-minute command on one H100; `qwen2.5-vl-7b` is the real architecture's shape, used
with random weights for speed benchmarks. A real checkpoint (Lingshu-7B, Qwen2.5-VL-3B/7B) is loaded
from its local directory and carries its own config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from echocxr.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    name: str
    # language model
    vocab_size: int = 4096  # from-scratch presets: replaced by the trained tokenizer's size
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    rope_theta: float = 10000.0
    mrope_section: tuple[int, int, int] = (8, 12, 12)  # halves of head_dim split over (t, h, w)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # vision tower
    vision_depth: int = 2
    vision_hidden_size: int = 128
    vision_heads: int = 4
    vision_intermediate_size: int = 256
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 56
    fullatt_block_indexes: tuple[int, ...] = (1,)
    # inputs
    image_size: int = 112  # square side in pixels (multiple of patch_size * spatial_merge_size)
    max_response_tokens: int = 160

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def image_tokens(self) -> int:
        side = self.image_size // (self.patch_size * self.spatial_merge_size)
        return side * side

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> ModelConfig:
        d = dict(d)
        for k in ("mrope_section", "fullatt_block_indexes"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        known = set(ModelConfig.__dataclass_fields__)
        return ModelConfig(**{k: v for k, v in d.items() if k in known})

    @staticmethod
    def from_hf(hf_config, name: str, image_size: int, max_response_tokens: int = 512) -> ModelConfig:
        """The shape of a plain Qwen2.5-VL folder (no echocxr.json, e.g. Lingshu-7B) from its
        transformers config; image_size: the square side its image processor produces."""
        t, v = hf_config.text_config, hf_config.vision_config
        rope = getattr(t, "rope_parameters", None) or getattr(t, "rope_scaling", None) or {}
        return ModelConfig(
            name=name,
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_layers=t.num_hidden_layers,
            num_heads=t.num_attention_heads,
            num_kv_heads=t.num_key_value_heads,
            rope_theta=float(rope.get("rope_theta", getattr(t, "rope_theta", 1e6))),
            mrope_section=tuple(rope["mrope_section"]),
            rms_norm_eps=t.rms_norm_eps,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            vision_depth=v.depth,
            vision_hidden_size=v.hidden_size,
            vision_heads=v.num_heads,
            vision_intermediate_size=v.intermediate_size,
            patch_size=v.patch_size,
            spatial_merge_size=v.spatial_merge_size,
            temporal_patch_size=v.temporal_patch_size,
            window_size=v.window_size,
            fullatt_block_indexes=tuple(v.fullatt_block_indexes),
            image_size=image_size,
            max_response_tokens=max_response_tokens,
        )


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny",
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mrope_section=(2, 3, 3),
        vision_depth=1,
        vision_hidden_size=32,
        vision_heads=2,
        vision_intermediate_size=64,
        fullatt_block_indexes=(0,),
        image_size=56,
        max_response_tokens=128,
    ),
    # CPU presets whose phantoms are large enough to show the findings (the CNN of `echocxr bench
    # phantoms` needed 160 px): 168 px = 6 x 6 merged tokens. `mini` runs `echocxr demo` in
    # <= 15 minutes on 2 cores, `base` the whole `run --preset base` chain in <= 60 (docs/PIPELINE.md).
    "mini": ModelConfig(
        name="mini",
        vocab_size=1024,
        hidden_size=96,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mrope_section=(4, 4, 4),
        vision_depth=2,
        vision_hidden_size=64,
        vision_heads=2,
        vision_intermediate_size=128,
        window_size=112,
        fullatt_block_indexes=(1,),
        image_size=168,
        max_response_tokens=128,
    ),
    "base": ModelConfig(
        name="base",
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=384,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        mrope_section=(4, 6, 6),
        vision_depth=3,
        vision_hidden_size=96,
        vision_heads=3,
        vision_intermediate_size=256,
        window_size=112,
        fullatt_block_indexes=(2,),
        image_size=168,
        max_response_tokens=128,
    ),
    "small": ModelConfig(
        name="small",
        vocab_size=4096,
        hidden_size=384,
        intermediate_size=1024,
        num_layers=8,
        num_heads=6,
        num_kv_heads=2,
        mrope_section=(8, 12, 12),
        vision_depth=4,
        vision_hidden_size=192,
        vision_heads=3,
        vision_intermediate_size=512,
        fullatt_block_indexes=(1, 3),
        image_size=112,
        max_response_tokens=192,
    ),
    # Qwen2.5-VL-7B (and Lingshu-7B) shape, for benchmarks with random weights.
    "qwen2.5-vl-7b": ModelConfig(
        name="qwen2.5-vl-7b",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        rope_theta=1000000.0,
        mrope_section=(16, 24, 24),
        vision_depth=32,
        vision_hidden_size=1280,
        vision_heads=16,
        vision_intermediate_size=3420,
        window_size=112,
        fullatt_block_indexes=(7, 15, 23, 31),
        image_size=672,
        max_response_tokens=512,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(
            f"unknown model preset {name!r}; choose one of {sorted(PRESETS)} or give a checkpoint path"
        )
    return replace(PRESETS[name], **overrides)
