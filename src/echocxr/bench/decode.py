"""`echocxr bench decode`: decode speed of any decoder, one JSON line per batch size.

Model: a trained checkpoint (`--ckpt`), or a preset shape with random weights (`--preset tiny
--random-weights` is a seconds-long CPU smoke check; `--shape qwen2.5-vl-7b --random-weights`
builds the real 7B architecture in bf16 directly on the device). Random weights rarely emit EOS
at a sensible place, so by default they ignore it (`--ignore-eos`): every row runs to
--max-new-tokens and all decoders produce the same number of tokens.

One `decode.engine.Engine` serves every run, so the KV cache is allocated and the CUDA graphs are
captured in the --warmup runs, not in the timed ones. Per batch size, after --warmup untimed runs,
--repeats timed `engine.generate` calls (prefill + decode loop); medians are reported:
- e2e_ms, prefill_ms (timed inside each call, CUDA-synchronized), decode_ms = e2e_ms - prefill_ms
  (each the median of its own per-run values);
- tokens: generated tokens of all rows (up to and including each row's EOS);
- tokens_per_s_decode = tokens / decode time, tokens_per_s_e2e = tokens / e2e time;
- ms_per_forward = decode time / forwards; forwards_per_token = forwards / longest row (one row's
  view: AR is 1 - 1/N, fused one-step ~ 1/B, unfused ~ 2/B);
- latency_per_report_s: e2e seconds (all rows of a batch finish together);
- peak_mem_mb: CUDA max allocated memory during the runs; on CPU the process's peak RSS
  (everything the process ever held, including the model; a coarse number).
Images are deterministic noise at the preset's size: the decoder's cost does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

from echocxr.errors import UserError

SMOKE_TEXTS = [
    "Findings: The heart is normal in size. No pleural effusion. No pneumothorax.\nImpression: Normal chest.",
    "Findings: Mild cardiomegaly. Small left pleural effusion.\nImpression: Cardiomegaly with effusion.",
    "所见：心影大小正常。无胸腔积液。无气胸。\n印象：胸部未见异常。",
] * 10


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--batch-size {text!r}: expected comma-separated integers like 1,8,32") from None
    if not sizes or min(sizes) < 1:
        raise UserError(f"--batch-size {text!r}: every batch size must be at least 1")
    return sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a trained checkpoint directory")
    src.add_argument(
        "--preset", "--shape", dest="preset", help="a model preset shape (tiny, small, qwen2.5-vl-7b)"
    )
    p.add_argument("--random-weights", action="store_true", help="required with --preset/--shape")
    p.add_argument("--decoder", choices=("ar", "block", "onestep"), default="ar")
    p.add_argument("--no-fuse", action="store_true", help="onestep: separate commit forward per block")
    p.add_argument("--block-size", type=int, help="default: DecodeConfig's")
    p.add_argument("--steps", type=int, help="block decoder: denoising steps per block (default: block size)")
    p.add_argument("--batch-size", default="1,8", help="comma-separated, e.g. 1,8,32")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--image-size", type=int, help="random weights: override the preset's image side (prompt length)"
    )
    p.add_argument("--images", type=int, default=1, help="images per study (prompt length)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CUDA-graph step (default: on with CUDA); --no-graphs runs the eager step",
    )
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run every row to --max-new-tokens (default: on with random weights)",
    )
    p.add_argument("--threads", type=int, help="CPU: torch intra-op threads (1 is steadiest on a shared box)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--append", help="also append the JSON lines to this JSONL file")


def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


@contextlib.contextmanager
def _build_on(device: str, dtype):
    """Create parameters directly on the device in the target dtype: a 7B model built in fp32 on
    the CPU first would take minutes and 30 GB of host memory."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def load_model(args, device: str):
    """-> (model, tokenizer, processor, label)"""
    from echocxr.model.config import get_preset
    from echocxr.model.image_processing import make_image_processor
    from echocxr.model.tokenizer import train_bpe
    from echocxr.model.vlm import EchoVLM

    dtype = _dtype(args.dtype, device)
    if args.ckpt:
        if args.random_weights or args.image_size:
            raise UserError("--random-weights and --image-size go with --preset/--shape, not --ckpt")
        model, tok, proc, _ = EchoVLM.from_pretrained(args.ckpt, device=device)
        if model.config is None:
            raise UserError(f"{args.ckpt}: no echocxr.json with the model preset")
        if args.dtype != "auto" or device.startswith("cuda"):
            model = model.to(dtype)
        return model.eval(), tok, proc, str(args.ckpt)
    if not args.random_weights:
        raise UserError("--preset/--shape builds an untrained model: add --random-weights to confirm")
    overrides = {"image_size": args.image_size} if args.image_size else {}
    cfg = get_preset(args.preset, **overrides)
    unit = cfg.patch_size * cfg.spatial_merge_size
    if cfg.image_size % unit:  # otherwise the processor's grid and the prompt's image slots disagree
        raise UserError(f"--image-size {cfg.image_size}: must be a multiple of {unit} for {cfg.name}")
    # A small BPE tokenizer carries the special tokens; the preset's vocab_size sets the LM head.
    tok = train_bpe(SMOKE_TEXTS, 300)
    with _build_on(device, dtype):
        model = EchoVLM.from_config(cfg, tok, dtype=dtype, seed=args.seed)
    return model.eval(), tok, make_image_processor(cfg.image_size), f"{cfg.name} (random weights)"


def _images(n: int, size: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)) for _ in range(n)]


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(engine, batch, cfg, *, warmup: int, repeats: int) -> dict:
    """Time `engine.generate` (one engine for every repeat: its cache and captured steps are set
    up in the warm-up runs, outside the timed ones). The prefill is timed inside each run."""
    import torch

    device = engine.device

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - t0

    run = lambda: engine.generate(batch, cfg)  # noqa: E731
    with torch.no_grad():
        for _ in range(warmup):
            run()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        pre_s, e2e_s, dec_s = [], [], []
        for _ in range(repeats):
            out, e2e = timed(run)
            pre_s.append(out.stats["prefill_s"])
            e2e_s.append(e2e)
            dec_s.append(e2e - out.stats["prefill_s"])
    tokens = sum(len(t) for t in out.tokens)
    longest = max(len(t) for t in out.tokens)
    e2e, pre, decode = statistics.median(e2e_s), statistics.median(pre_s), statistics.median(dec_s)
    ok = decode > 0  # with a tiny model on a loaded box the decode part can round to nothing
    return {
        "prefill_timing": "in-run",
        "tokens": tokens,
        "longest": longest,
        "forwards": out.forwards,
        "prefill_ms": round(pre * 1e3, 3),
        "decode_ms": round(decode * 1e3, 3) if ok else None,
        "e2e_ms": round(e2e * 1e3, 3),
        "tokens_per_s_decode": round(tokens / decode, 2) if ok else None,
        "tokens_per_s_e2e": round(tokens / e2e, 2),
        "ms_per_forward": round(decode * 1e3 / out.forwards, 3) if ok and out.forwards else None,
        "forwards_per_token": round(out.forwards / longest, 4),
        "latency_per_report_s": round(e2e, 4),
        "e2e_ms_all": [round(s * 1e3, 3) for s in e2e_s],
        "mode": out.stats.get("mode"),
        "kv_allocations": engine.allocations,
        "peak_mem_mb": round(_peak_mb(str(device)), 1),
    }


def run(args) -> int:
    import torch
    import transformers

    from echocxr.batch import Example, collate
    from echocxr.decode.cli import resolve_device
    from echocxr.decode.config import DecodeConfig
    from echocxr.decode.engine import Engine

    sizes = _batch_sizes(args.batch_size)
    if args.repeats < 1 or args.warmup < 0 or args.max_new_tokens < 1 or args.images < 1:
        raise UserError("--repeats, --max-new-tokens and --images must be >= 1, --warmup >= 0")
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.graphs and not device.startswith("cuda"):
        raise UserError("--graphs needs a CUDA device (CUDA graphs); use --no-graphs on CPU")
    overrides = {"block_size": args.block_size, "steps": args.steps, "fused": False if args.no_fuse else None}
    cfg = DecodeConfig(
        decoder=args.decoder,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    model, tok, proc, label = load_model(args, device)
    ignore_eos = args.random_weights if args.ignore_eos is None else args.ignore_eos
    if ignore_eos:  # no sampled id equals -1, so no row ever stops early
        model.special = replace(model.special, eos=-1)
    mode = None if args.graphs is None else ("graph" if args.graphs else "eager")
    engine = Engine(model, cfg, device=device, tokenizer=tok, processor=proc, mode=mode)
    lines = []
    for bs in sizes:
        examples = [
            Example(_images(args.images, model.config.image_size, args.seed + i), "en") for i in range(bs)
        ]
        batch = collate(examples, tok, proc, model.config.image_tokens).to(device)
        m = measure(engine, batch, cfg, warmup=args.warmup, repeats=args.repeats)
        row = {
            "bench": "decode",
            "decoder": cfg.decoder,
            "fused": cfg.fused if cfg.decoder == "onestep" else None,
            "block_size": cfg.block_size if cfg.decoder != "ar" else None,
            "steps": cfg.steps if cfg.decoder == "block" else None,
            "model": label,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "dtype": str(model.dtype).removeprefix("torch."),
            "batch_size": bs,
            "prompt_len": batch.prompt_ids.shape[1],
            "max_new_tokens": cfg.max_new_tokens,
            "ignore_eos": ignore_eos,
            **m,
            "device": _device_name(device),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "warmup": args.warmup,
            "repeats": args.repeats,
        }
        line = json.dumps(row, ensure_ascii=False)
        print(line, flush=True)
        lines.append(line)
    if args.append:
        path = Path(args.append)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write("".join(x + "\n" for x in lines))
    return 0
