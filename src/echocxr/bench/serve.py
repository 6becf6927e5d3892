"""`echocxr bench serve`: throughput and latency of `echocxr serve`, dynamic batching on and off.

For each concurrency C and batching mode (alternating, so a drift in machine load hits both
alike) the app is started in this process on 127.0.0.1 (a free port; nothing else is contacted)
with `--max-batch` (on) or 1 (off: one request at a time); after `--warmup` requests,
C closed-loop clients (httpx, asyncio) each send the next request as soon as the
previous one returned, until `--requests` requests were sent or `--time-limit` seconds passed.
Every request is the same OpenAI chat completion (one image, temperature 0), so every report has
the same length and the modes are compared on equal work. One JSON line per (mode, concurrency):

- reports_per_s, tokens_per_s: completed requests and generated tokens (EOS excluded) / wall time;
- p50_ms, p99_ms, mean_ms: request latency seen by the client (HTTP, queue, prefill, decode);
- mean_batch: mean rows per decode batch the server reported for these requests;
- direct_p50_ms (concurrency 1 lines): the median time to decode the same image in-process without
  HTTP (read upload, preprocess, collate, decode at batch 1: the per-image work of `echocxr
  generate`, without its process start and model load); overhead = p50_ms / direct_p50_ms - 1.

The server and its decode thread run in this process; the clients run in a spawned child
process, so they do not compete with the server for this process's GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import multiprocessing
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from echocxr.decode.config import DECODERS
from echocxr.errors import UserError


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers like 1,8,32") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag} {text!r}: every value must be at least 1")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint directory (from echocxr train)")
    p.add_argument("--image", required=True, help="PNG, JPEG or DICOM sent with every request")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=64, help="requests per (mode, concurrency), at most")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per (mode, concurrency), at most")
    p.add_argument("--max-batch", type=int, default=32, help="rows per decode batch with batching on")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--max-tokens", type=int, default=None, help="per request (default: the server's)")
    p.add_argument("--modes", default="on,off", help="batching modes to run: on, off or both")
    p.add_argument("--decoder", choices=DECODERS, help="default: from the checkpoint")
    p.add_argument("--direct-repeats", type=int, default=5, help="timed in-process decodes for direct_p50_ms")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests per mode")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--append", help="also append the JSON lines to this file")


def _percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default rule) of a non-empty list."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def _load(url: str, body: dict, concurrency: int, n: int, time_limit: float) -> dict:
    import httpx

    lat, toks, batch = [], [], []
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()

        async def worker() -> None:
            nonlocal sent
            while sent < n and time.perf_counter() - t0 < time_limit:
                sent += 1
                t = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"server answered {r.status_code}: {r.text[:200]}")
                lat.append((time.perf_counter() - t) * 1000)
                out = r.json()
                toks.append(out["usage"]["completion_tokens"])
                batch.append(out["echocxr"]["batch_size"])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "requests": len(lat),
        "wall_s": round(wall, 3),
        "reports_per_s": round(len(lat) / wall, 3),
        "tokens_per_s": round(sum(toks) / wall, 1),
        "tokens_per_report": round(statistics.mean(toks), 1),
        "p50_ms": round(_percentile(lat, 50), 1),
        "p99_ms": round(_percentile(lat, 99), 1),
        "mean_ms": round(statistics.mean(lat), 1),
        "mean_batch": round(statistics.mean(batch), 2),
    }


def _load_in_process(url: str, body: dict, concurrency: int, n: int, time_limit: float) -> dict:
    """`_load` run in the client process (a top-level function, so a spawned process can run it)."""
    return asyncio.run(_load(url, body, concurrency, n, time_limit))


def _direct_ms(backend, data: bytes, name: str, cfg, repeats: int) -> float:
    """Median ms to decode the image in-process at batch 1 (the per-image work of generate), in a
    thread of its own as the server's decode thread is."""
    from echocxr.serve.images import decode_upload

    times = []

    def work() -> None:
        for _ in range(repeats + 1):  # the first is a warm-up
            t = time.perf_counter()
            example = backend.example([decode_upload(data, name, max_side=1 << 30)], "en")
            backend.decode([example], cfg, [cfg.max_new_tokens])
            times.append((time.perf_counter() - t) * 1000)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return statistics.median(times[1:])


def run(args) -> int:
    import platform

    import torch

    from echocxr.serve.app import create_app
    from echocxr.serve.backend import ReportBackend
    from echocxr.serve.background import BackgroundServer
    from echocxr.serve.config import Limits, ServeConfig

    levels = _ints(args.concurrency, "--concurrency")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"on", "off"}:
        raise UserError(f"--modes {args.modes!r}: use on, off or on,off")
    if args.requests < 1 or args.time_limit <= 0:
        raise UserError("--requests must be at least 1 and --time-limit positive")
    image = Path(args.image)
    if not image.is_file():
        raise UserError(f"{image}: image file not found")
    data = image.read_bytes()
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = ReportBackend(args.ckpt, device=args.device, decoder=args.decoder)
    limits = Limits(max_tokens=max(Limits().max_tokens, args.max_tokens or 0), max_queue=max(levels) * 2 + 8)
    from dataclasses import replace

    cfg = replace(backend.cfg, max_new_tokens=args.max_tokens or backend.cfg.max_new_tokens)
    direct = _direct_ms(backend, data, image.name, cfg, args.direct_repeats)
    mime = {"png": "image/png", "jpeg": "image/jpeg", "dicom": "application/dicom"}
    from echocxr.serve.images import kind

    uri = f"data:{mime.get(kind(data), 'application/octet-stream')};base64," + base64.b64encode(data).decode()
    body = {
        "model": "echocxr",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}],
        "temperature": 0,
        "max_tokens": cfg.max_new_tokens,
    }
    common = {
        "bench": "serve",
        "ckpt": str(args.ckpt),
        "stage": backend.stage,
        "decoder": cfg.decoder,
        "block_size": cfg.block_size,
        "max_tokens": cfg.max_new_tokens,
        "image": image.name,
        "device": args.device
        if args.device != "cpu"
        else f"cpu {platform.machine()} ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    lines = []
    # The clients run in a child process, as real clients would, not competing for this GIL.
    clients = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    for c in levels:  # modes alternate per concurrency, so a drift in machine load hits both alike
        for mode in modes:
            max_batch = args.max_batch if mode == "on" else 1
            serve_cfg = ServeConfig(max_batch=max_batch, max_wait_ms=args.max_wait_ms, limits=limits)
            with BackgroundServer(create_app(backend, serve_cfg)) as url:
                if args.warmup:
                    warm = (url, body, min(c, args.warmup), args.warmup, args.time_limit)
                    clients.submit(_load_in_process, *warm).result()
                stats = clients.submit(
                    _load_in_process, url, body, c, args.requests, args.time_limit
                ).result()
            line = {**common, "batching": mode == "on", "max_batch": max_batch, "concurrency": c, **stats}
            if c == 1:
                line["direct_p50_ms"] = round(direct, 1)
                line["overhead"] = round(stats["p50_ms"] / direct - 1, 3)
            print(json.dumps(line), flush=True)
            lines.append(line)
    clients.shutdown()
    if args.append:
        path = Path(args.append)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)
    by = {(x["batching"], x["concurrency"]): x for x in lines}
    for c in levels:
        if (True, c) in by and (False, c) in by:
            gain = by[True, c]["reports_per_s"] / by[False, c]["reports_per_s"]
            print(f"concurrency {c}: batching gives {gain:.2f}x the reports/s", file=sys.stderr)
    return 0
