"""`echocxr train --stage vision|ar|rad|dcd`: one entry point for the stages.

    echocxr train --stage vision --init tiny|small|CKPT_DIR --corpus corpus.jsonl --out runs/vision --steps N
    echocxr train --stage ar  --init tiny|small|CKPT_DIR --corpus corpus.jsonl --out runs/ar  --steps N
    echocxr train --stage rad --init runs/ar/final       --corpus corpus.jsonl --out runs/rad --block-size 4
    echocxr train --stage dcd --init runs/rad/final      --corpus corpus.jsonl --out runs/dcd

`--init` a preset builds a random model of that shape and a byte-level BPE tokenizer trained on the
corpus (EN and ZH); a folder loads a checkpoint (a previous stage, or a local Qwen2.5-VL /
Lingshu-7B directory). Multi-GPU: `torchrun --nproc-per-node G -m echocxr train ...` (DDP; each
process reads its share of every step's batch, see train/data.py); add `--fsdp` to shard the model
(FSDP2, full fine-tuning of 7B) and `--activation-checkpointing` to trade compute for memory. The final checkpoint is
OUT/final (Hugging Face layout plus echocxr.json with the stage and its block size).
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import torch

from echocxr.errors import UserError

STAGES = {
    "vision": "echocxr.train.vision",  # Stage 0: vision warm-start (skipped for a pretrained --init)
    "ar": "echocxr.train.ar",
    "rad": "echocxr.train.rad",
    "dcd": "echocxr.train.dcd",
}
TOKENIZER_DIR = "tokenizer"  # OUT/tokenizer: the BPE trained for a preset, reused on resume


def add_arguments(p) -> None:
    from echocxr.train.loop import TrainConfig

    d = TrainConfig(steps=1)
    p.add_argument("--stage", choices=sorted(STAGES), required=True)
    p.add_argument("--corpus", required=True, help="corpus JSONL from `echocxr data build` (train split)")
    p.add_argument("--init", required=True, help="model preset (tiny, small) or a checkpoint folder")
    p.add_argument("--out", required=True, help="run folder: log.jsonl, ckpt/, final/")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="studies per process per micro-batch")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps, then cosine decay")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clip (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt (a fresh start if none)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="intermediate checkpoint period")
    p.add_argument("--keep", type=int, default=d.keep, help="intermediate checkpoints kept")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--image-source", choices=("auto", "phantom", "real"), default="auto")
    p.add_argument("--max-response", type=int, default=None, help="response tokens (default: preset's)")
    p.add_argument(
        "--vision-from",
        default=None,
        help="with a preset --init: copy the vision tower and merger from this checkpoint (a Stage 0 "
        "final/ of the same preset) and fit the BPE on --corpus as usual",
    )
    p.add_argument(
        "--repeat-abnormal",
        type=int,
        default=1,
        help="studies whose report has an abnormal finding appear this many times per epoch (default 1)",
    )
    p.add_argument("--workers", type=int, default=d.workers, help="data-loading processes")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (peft); 0: full")
    p.add_argument("--lora-alpha", type=float, default=None, help="default: 2 * rank")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="parameter dtype (bf16 for 7B LoRA)",
    )
    p.add_argument(
        "--save-dtype", choices=("float32", "bfloat16"), default="float32", help="final checkpoint dtype"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to log.jsonl)")
    p.add_argument("--block-size", type=int, default=None, help="diffusion block size (rad, dcd)")
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="FSDP2: shard parameters, gradients and optimizer state over the torchrun processes",
    )
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each decoder layer's activations in backward (less memory, ~1/3 more compute)",
    )
    for module in STAGES.values():
        importlib.import_module(module).add_stage_arguments(p)


def _device(arg: str | None, local_rank: int) -> torch.device:
    if arg is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(arg)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {arg}: no CUDA device on this machine")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def build_model(args, out: Path, dist_info):
    """(model, tokenizer, processor, meta) for --init: a preset (fresh weights, corpus BPE) or a folder."""
    from echocxr.model.config import PRESETS, get_preset
    from echocxr.model.image_processing import make_image_processor
    from echocxr.model.vlm import EchoVLM
    from echocxr.train.loop import barrier

    dtype = getattr(torch, args.dtype)
    if args.init in PRESETS:
        from transformers import AutoTokenizer

        cfg = get_preset(args.init)
        tok_dir = out / TOKENIZER_DIR
        if dist_info.main and not (tok_dir / "tokenizer.json").is_file():
            tokenizer = _train_tokenizer(args.corpus, cfg.vocab_size)
            tmp = out / ".tmp-tokenizer"
            shutil.rmtree(tmp, ignore_errors=True)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(tok_dir, ignore_errors=True)
            tmp.rename(tok_dir)
        barrier(dist_info)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        model = EchoVLM.from_config(cfg, tokenizer, dtype=dtype, seed=args.seed)
        meta = copy_vision(model, Path(args.vision_from)) if getattr(args, "vision_from", None) else {}
        return model, tokenizer, make_image_processor(cfg.image_size), meta
    path = Path(args.init)
    if not path.exists():
        raise UserError(f"--init {args.init}: neither a preset ({', '.join(PRESETS)}) nor an existing folder")
    if getattr(args, "vision_from", None):
        raise UserError("--vision-from applies to a preset --init; a checkpoint folder brings its own tower")
    return EchoVLM.from_pretrained(path, dtype=dtype)


def copy_vision(model, source: Path) -> dict:
    """Load `source`'s vision tower and patch merger (`model.visual`) into a fresh preset model, so a
    second chain on other report text (the pipeline's original-text ablation) starts from the same
    Stage 0 tower without training it again. Returns the source's metadata (its `trained_on` and
    image counts carry forward). Raises UserError when the folder is missing or its tower has
    another shape."""
    from echocxr.model.vlm import EchoVLM

    if not source.is_dir():
        raise UserError(f"--vision-from {source}: not a checkpoint folder")
    src, _, _, meta = EchoVLM.from_pretrained(source)
    try:
        model.visual.load_state_dict(src.visual.state_dict())
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(
            f"--vision-from {source}: its vision tower does not fit this preset ({first})"
        ) from None
    return meta


def _train_tokenizer(corpus: str, vocab_size: int):
    from echocxr.data.records import read_jsonl
    from echocxr.model.tokenizer import train_bpe

    if not Path(corpus).is_file():
        raise UserError(f"{corpus}: corpus file not found (make one with `echocxr data build`)")
    texts = [r.report for r in read_jsonl(corpus) if r.split == "train"]
    if not texts:
        raise UserError(f"{corpus}: no training records to fit the tokenizer on")
    return train_bpe(texts, vocab_size)


def run(args) -> int:
    from dataclasses import asdict

    from echocxr.model.image_processing import REAL_IMAGE_SIZE, image_tokens
    from echocxr.train.data import StudyStream, image_provenance
    from echocxr.train.loop import FINAL_DIR, TrainConfig, barrier, init_distributed, train

    if args.stage == "vision":
        from echocxr.train.vision import is_pretrained

        if is_pretrained(args.init):
            print(
                f"--init {args.init} is a pretrained checkpoint: its vision tower is trained, so Stage 0 "
                f"is skipped; continue with `echocxr train --stage ar --init {args.init}`"
            )
            return 0
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        grad_accum=args.grad_accum,
        clip=args.clip,
        save_every=args.save_every,
        keep=args.keep,
        log_every=args.log_every,
        workers=args.workers,
        seed=args.seed,
        fsdp=args.fsdp,
        activation_checkpointing=args.activation_checkpointing,
    )
    if args.fsdp and args.lora_rank:
        raise UserError("--fsdp shards a full fine-tune; train LoRA adapters without it (DDP)")
    if args.fsdp and "WORLD_SIZE" not in os.environ:
        raise UserError("--fsdp needs torchrun: torchrun --nproc-per-node G -m echocxr train ... --fsdp")
    dist_info = init_distributed(
        args.device or ("cuda" if torch.cuda.is_available() else "cpu"), always=args.fsdp
    )
    device = _device(args.device, dist_info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(args.corpus).is_file():
        raise UserError(f"{args.corpus}: corpus file not found (make one with `echocxr data build`)")

    model, tokenizer, processor, meta = build_model(args, out, dist_info)
    model = model.to(device)
    stage = importlib.import_module(STAGES[args.stage]).build_stage(args, model, tokenizer, processor)
    if getattr(stage, "freeze_vision", False):
        model.visual.requires_grad_(False)
    lora = None
    if args.lora_rank:
        from echocxr.train.lora import add_lora

        lora = add_lora(model, args.lora_rank, args.lora_alpha)

    max_response = args.max_response or (model.config.max_response_tokens if model.config else 512)
    stream = None
    if getattr(stage, "uses_loop_batches", True):
        stream = StudyStream(
            args.corpus,
            tokenizer=tokenizer,
            processor=processor,
            tokens_per_image=model.config.image_tokens
            if model.config
            else image_tokens(processor, REAL_IMAGE_SIZE),
            image_size=model.config.image_size if model.config else REAL_IMAGE_SIZE,
            seed=args.seed,
            image_source=args.image_source,
            max_response=max_response,
            multiple_of=stage.multiple_of,
            repeat_abnormal=args.repeat_abnormal,
        )
    run_args = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    run_args["world"] = dist_info.world
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if dist_info.main:
        total = sum(p.numel() for p in model.parameters())
        print(
            f"train {stage.name}: {n_train:,} of {total:,} parameters trainable on {device} x{dist_info.world}"
        )
    summary = train(
        model,
        stage,
        stream,
        cfg,
        out,
        run_args=run_args,
        resume=args.resume,
        dist_info=dist_info,
        progress=not args.no_progress,
    )
    weights = full = None
    if args.fsdp:  # gather the shards (every rank takes part), then rank 0 writes the HF folder
        from echocxr.train.loop import full_state_dict

        full = full_state_dict(model)
        weights = {k.removeprefix("hf."): v for k, v in full.items() if k.startswith("hf.")}
        if args.save_dtype == "bfloat16":
            weights = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in weights.items()}
    if dist_info.main:
        if lora is not None:
            from echocxr.train.lora import merge_lora

            merge_lora(model, lora)
        final, tmp = out / FINAL_DIR, out / f".tmp-{FINAL_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        meta_out = dict(stage.checkpoint_meta)
        meta_out.update(stage=stage.name, train={**asdict(cfg), "final": summary, "init": args.init})
        meta_out.update(image_provenance(meta or {}, stage.name, summary.get("images")))
        if args.save_dtype == "bfloat16" and weights is None:
            model = model.to(torch.bfloat16)
        model.save_pretrained(tmp, tokenizer, processor, extra=meta_out, state_dict=weights)
        if hasattr(stage, "save_extra"):  # Stage 0: its head, beside (not inside) the VLM weights
            stage.save_extra(model, tmp, full_state=full)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        print(f"final checkpoint: {final}")
    barrier(dist_info)
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0
