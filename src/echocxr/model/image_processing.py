"""The Qwen2.5-VL image processor (transformers), sized to a preset's square input."""

from __future__ import annotations

from pathlib import Path

import torch


def _processor_class():
    # transformers >= 5.x names the PIL/numpy backend explicitly; the plain class needs torchvision.
    try:
        from transformers import Qwen2VLImageProcessorPil as cls
    except ImportError:
        from transformers import Qwen2VLImageProcessor as cls
    return cls


def make_image_processor(image_size: int):
    """Resize every image to image_size x image_size (a multiple of 28) before patching."""
    cls = _processor_class()
    pixels = image_size * image_size
    return cls(min_pixels=pixels, max_pixels=pixels, size={"shortest_edge": pixels, "longest_edge": pixels})


def load_image_processor(path: Path, cfg=None):
    if (Path(path) / "preprocessor_config.json").is_file():
        return _processor_class().from_pretrained(path)
    return make_image_processor(cfg.image_size if cfg else 448)


def preprocess(processor, images) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL images (any mode) -> (pixel_values [N_patches, C*T*P*P], grid_thw [n_images, 3])."""
    rgb = [im.convert("RGB") for im in images]
    out = processor(images=rgb, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]
