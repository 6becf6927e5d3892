"""The Qwen2.5-VL image processor (transformers), sized to a preset's square input.

Images reach the processor already square (`echocxr.data.images.prepare_image` pads them), so the
processor's own aspect-ratio-keeping resize (`smart_resize`) only changes their scale: a side x side
square becomes (side/28)^2 vision tokens once side is a multiple of 28 within the pixel bounds.
docs/IMAGES.md gives the counts per preset.
"""

from __future__ import annotations

from pathlib import Path

import torch

from echocxr.errors import UserError

# Image side for a checkpoint without a preset (a real Qwen2.5-VL folder without echocxr.json):
# phantoms are rendered at it and its processor (min/max pixels) resizes from there.
REAL_IMAGE_SIZE = 448


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


def _pixel_bounds(processor) -> tuple[int | None, int | None]:
    """(min_pixels, max_pixels) as the processor holds them (a dict or SizeDict `size`, or attributes)."""
    size = getattr(processor, "size", None) or {}

    def get(key):
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    lo = getattr(processor, "min_pixels", None) or get("shortest_edge")
    hi = getattr(processor, "max_pixels", None) or get("longest_edge")
    return lo, hi


def image_tokens(processor, side: int) -> int:
    """Vision tokens (after the spatial merge) the processor makes from one side x side image."""
    from PIL import Image

    _, grid = preprocess(processor, [Image.new("L", (side, side))])
    return int(grid[0].prod()) // int(processor.merge_size) ** 2


def processed_side(processor, side: int) -> int:
    """The square side (pixels) the processor resizes a side x side image to (its pixel limits)."""
    from PIL import Image

    _, grid = preprocess(processor, [Image.new("L", (side, side))])
    return int(grid[0, 1]) * int(processor.patch_size)


def load_image_processor(path: Path, cfg=None):
    """The checkpoint's own processor (its preprocessor_config.json, e.g. a real Qwen2.5-VL
    checkpoint's min/max pixels) or, without one, the preset's fixed-size processor.

    Raises `UserError` naming the file when it cannot be read, or when its settings would turn the
    model's cfg.image_size square into a different number of tokens than cfg.image_tokens (the
    prompt's image slots): e.g. max_pixels below image_size^2.
    """
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return make_image_processor(cfg.image_size if cfg else REAL_IMAGE_SIZE)
    try:
        processor = _processor_class().from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(
            f"{file}: cannot read the image processor settings ({' '.join(str(e).split())})"
        ) from None
    if cfg is not None:
        try:
            n = image_tokens(processor, cfg.image_size)
        except (ValueError, TypeError, AttributeError) as e:
            raise UserError(
                f"{file}: the image processor fails on a {cfg.image_size} px square ({e})"
            ) from None
        if n != cfg.image_tokens:
            lo, hi = _pixel_bounds(processor)
            side = cfg.image_size
            raise UserError(
                f"{file}: min/max pixels {lo}/{hi} turn the model's {side}x{side} input into {n} image tokens, "
                f"but the model was trained with {cfg.image_tokens}; they must admit {side * side} pixels"
            )
    return processor


def preprocess(processor, images) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL images (any mode) -> (pixel_values [N_patches, C*T*P*P], grid_thw [n_images, 3]).

    Expects images already through `prepare_image` (square); the processor only rescales them.
    """
    rgb = [im.convert("RGB") for im in images]
    out = processor(images=rgb, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]
