"""`echocxr serve --ckpt DIR`: load the checkpoint once and serve it over HTTP (uvicorn).

Binds 127.0.0.1 by default; pass --host 0.0.0.0 deliberately to expose it. Ctrl-C (SIGINT/SIGTERM)
stops accepting connections, lets in-flight requests finish, then drains the batcher's queue.
"""

from __future__ import annotations

import argparse

from echocxr.decode.config import DECODERS
from echocxr.serve.config import Limits, ServeConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    d, lim = ServeConfig(), Limits()
    p.add_argument("--ckpt", required=True, help="checkpoint directory (from echocxr train)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--max-batch", type=int, default=d.max_batch, help="rows per decode batch (1: no batching)"
    )
    p.add_argument(
        "--max-wait-ms", type=float, default=d.max_wait_ms, help="how long a request waits for batch-mates"
    )
    p.add_argument("--decoder", choices=DECODERS, help="default: from the checkpoint's stage")
    p.add_argument("--block-size", type=int, help="default: the checkpoint's block size")
    p.add_argument("--steps", type=int, help="denoising steps per block for the block decoder")
    p.add_argument("--no-fuse", action="store_true", help="onestep: separate commit forward")
    p.add_argument("--model-name", help="the id clients send as `model` (default: echocxr)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-body-mb", type=float, default=lim.max_body_bytes / 2**20)
    p.add_argument("--max-images", type=int, default=lim.max_images)
    p.add_argument("--max-side", type=int, default=lim.max_side, help="largest image side in pixels")
    p.add_argument(
        "--max-tokens", type=int, default=lim.max_tokens, help="ceiling for a request's max_tokens"
    )
    p.add_argument("--request-timeout", type=float, default=lim.request_timeout_s, help="seconds")
    p.add_argument("--max-queue", type=int, default=lim.max_queue)


def config_from_args(args) -> ServeConfig:
    limits = Limits(
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_images=args.max_images,
        max_side=args.max_side,
        max_tokens=args.max_tokens,
        request_timeout_s=args.request_timeout,
        max_queue=args.max_queue,
    )
    return ServeConfig(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, model_name=args.model_name, limits=limits
    )


def run(args) -> int:
    import torch
    import uvicorn

    from echocxr.decode.cli import resolve_device
    from echocxr.serve.app import create_app
    from echocxr.serve.backend import ReportBackend

    config = config_from_args(args)  # bad limits fail before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = ReportBackend(
        args.ckpt,
        device=resolve_device(args.device),
        decoder=args.decoder,
        block_size=args.block_size,
        steps=args.steps,
        fused=False if args.no_fuse else None,
    )
    app = create_app(backend, config)
    print(
        f"echocxr serve: http://{args.host}:{args.port}/ ({backend.cfg.decoder}, block {backend.cfg.block_size})"
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=60)
    return 0
