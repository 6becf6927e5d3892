"""`echocxr generate`: reports for radiographs (PNG, JPEG, DICOM) with a trained checkpoint.

One report per image. The decoder defaults to the checkpoint's stage (ar -> "ar", rad ->
"block", dcd -> "onestep") and the block size to the one it was trained with. Output: a JSON list
with, per image, file, findings, impression, report, decoder, tokens and seconds (the wall time
of its batch divided by the batch's rows; exact with the default --batch-size 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from echocxr.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="PNG, JPEG or DICOM files, one report each")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (HF layout, from echocxr train)")
    p.add_argument(
        "--decoder", choices=("ar", "block", "onestep"), help="default: from the checkpoint's stage"
    )
    p.add_argument(
        "--block-size", type=int, help="default: the checkpoint's block size (DecodeConfig's otherwise)"
    )
    p.add_argument(
        "--steps", type=int, help="denoising steps per block for --decoder block (default: block size)"
    )
    p.add_argument("--no-fuse", action="store_true", help="onestep: separate commit forward (2N forwards)")
    p.add_argument("--temperature", type=float, help="0 = greedy (the default)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (default 0: off)")
    p.add_argument("--language", choices=("en", "zh"), default="en")
    p.add_argument("--max-new-tokens", type=int, help="default: the checkpoint's max_response_tokens")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, help="sampling seed (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--json", help="write the results here (default: print them)")


def load_image(path: str | os.PathLike):
    """A grayscale PIL image; the data package's loader (DICOM windowing) when it is installed."""
    try:
        from echocxr.data.images import load_image as data_load_image
    except ImportError:
        return _load_image_plain(Path(path))
    return data_load_image(path)


def _load_image_plain(path: Path):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UserError(f"{path}: image file not found")
    with path.open("rb") as f:
        head = f.read(132)
    if path.suffix.lower() in (".dcm", ".dicom") or head[128:132] == b"DICM":
        import pydicom

        try:
            pixels = pydicom.dcmread(path).pixel_array.astype(np.float64)
        except Exception as e:  # pydicom raises many types for broken files; all mean "unreadable"
            raise UserError(f"{path}: unreadable DICOM ({e})") from None
        lo, hi = np.percentile(pixels, (0.5, 99.5))  # plain min/max windowing is dominated by outliers
        scaled = np.clip((pixels - lo) * (255.0 / max(hi - lo, 1e-6)), 0, 255)
        return Image.fromarray(scaled.astype(np.uint8)).convert("L")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("L")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: unreadable or corrupt image ({e})") from None


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return name


def decode_overrides(args) -> dict:
    """The DecodeConfig fields the command line sets (None: the checkpoint's or the default)."""
    return {
        "decoder": args.decoder,
        "max_new_tokens": args.max_new_tokens,
        "block_size": args.block_size,
        "steps": args.steps,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "fused": False if args.no_fuse else None,
        "seed": args.seed,
    }


def write_json(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
    os.replace(tmp, path)


def run(args) -> int:
    import torch

    from echocxr.batch import Example, collate
    from echocxr.data.records import parse_report
    from echocxr.decode.engine import Engine

    if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise UserError("--batch-size and --max-new-tokens must be at least 1")
    images = [load_image(p) for p in args.images]  # every file checked before the model loads
    device = resolve_device(args.device)
    engine = Engine.from_checkpoint(args.ckpt, device=device, **decode_overrides(args))
    cfg, model = engine.cfg, engine.model
    results = []
    for i in range(0, len(images), args.batch_size):
        files, ims = args.images[i : i + args.batch_size], images[i : i + args.batch_size]
        examples = [Example([im], args.language, record_id=str(f)) for f, im in zip(files, ims, strict=True)]
        batch = collate(examples, engine.tokenizer, engine.processor, model.config.image_tokens).to(device)
        t0 = time.perf_counter()
        out = engine.generate(batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / len(files)
        for f, toks in zip(files, out.tokens, strict=True):
            text = engine.text(toks)
            results.append(
                {
                    "file": str(f),
                    **parse_report(text),
                    "report": text,
                    "decoder": cfg.decoder + ("" if cfg.decoder != "onestep" or cfg.fused else "-unfused"),
                    "tokens": len(toks),
                    "seconds": round(seconds, 4),
                }
            )
    if args.json:
        write_json(args.json, results)
        print(f"wrote {len(results)} reports to {args.json}", file=sys.stderr)
    else:
        print(json.dumps(results, ensure_ascii=False, indent=2))
    return 0
