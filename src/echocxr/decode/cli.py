"""`echocxr generate`: reports for radiographs (PNG, JPEG, DICOM) with a trained checkpoint.

With image paths: one report per image, as a JSON list. With `--studies` (a corpus JSONL, a CSV
manifest or a folder of DICOM studies) and `--out DIR`: one report per study in
DIR/reports.jsonl, resumable and sharded over ranks under torchrun (`decode.archive`); docs/ARCHIVE.md.
 The decoder defaults to the checkpoint's stage (ar -> "ar", rad ->
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
    p.add_argument("images", nargs="*", help="PNG, JPEG or DICOM files, one report each")
    p.add_argument(
        "--studies", help="a corpus .jsonl, a .csv manifest or a folder (DICOM grouped by StudyInstanceUID)"
    )
    p.add_argument("--out", help="--studies: output folder (reports.jsonl, skipped.jsonl); rerun to resume")
    p.add_argument(
        "--sr-out", help="--studies: also write a DICOM Basic Text SR per study here (DICOM inputs)"
    )
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
    p.add_argument(
        "--language", choices=("en", "zh"), help="default en (--studies: for studies that state none)"
    )
    p.add_argument("--max-new-tokens", type=int, help="default: the checkpoint's max_response_tokens")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, help="sampling seed (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--json", help="write the results here (default: print them)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="--studies: no progress bar")


def load_image(path: str | os.PathLike):
    """A grayscale PIL image at the file's size (`echocxr.data.images.load_image`: DICOM windowing,
    EXIF orientation, size checks); `UserError` naming the file when it cannot be used."""
    from echocxr.data.images import load_image as data_load_image

    return data_load_image(path)


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


def decoder_name(cfg) -> str:
    """The decoder as reports name it: ar, block, onestep or onestep-unfused."""
    return cfg.decoder + ("" if cfg.decoder != "onestep" or cfg.fused else "-unfused")


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
    from echocxr.data.images import prepare_image
    from echocxr.data.records import parse_report
    from echocxr.decode.engine import Engine

    if args.studies:
        if args.images or args.json:
            raise UserError("give either image paths or --studies (with --out), not both")
        from echocxr.decode.archive import run_studies

        return run_studies(args)
    if not args.images:
        raise UserError("give image paths, or --studies FILE_OR_FOLDER --out DIR")
    if args.out or args.sr_out:
        raise UserError("--out and --sr-out go with --studies; for image paths use --json")
    if args.threads:
        torch.set_num_threads(args.threads)
    language = args.language or "en"
    if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise UserError("--batch-size and --max-new-tokens must be at least 1")
    images = [load_image(p) for p in args.images]  # every file checked before the model loads
    device = resolve_device(args.device)
    engine = Engine.from_checkpoint(args.ckpt, device=device, **decode_overrides(args))
    cfg, model = engine.cfg, engine.model
    # The same step as training: pad to the model's square input (aspect ratio kept), so the
    # processor's grid matches the prompt's image slots whatever the file's shape.
    images = [prepare_image(im, model.config.image_size) for im in images]
    results = []
    for i in range(0, len(images), args.batch_size):
        files, ims = args.images[i : i + args.batch_size], images[i : i + args.batch_size]
        examples = [Example([im], language, record_id=str(f)) for f, im in zip(files, ims, strict=True)]
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
                    "decoder": decoder_name(cfg),
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
