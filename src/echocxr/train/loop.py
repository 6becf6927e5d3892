"""The training loop shared by stages 1 to 3.

A stage object supplies the objective: `name`, `multiple_of` (response padding), `freeze_vision`,
`loss(model, batch, step) -> (loss, logs)`, `state_dict()` / `load_state_dict()` and
`checkpoint_meta`; optionally `uses_loop_batches = False` when it draws its own batches (DCD
trains on teacher rollouts and reads only `batch.size`) and `set_distributed(rank, world)` when it
shares work of its own out across processes (DCD's rollouts).

The loop: AdamW with linear warmup and cosine decay, gradient accumulation, clipping, bf16
autocast on CUDA (fp32 master weights), DDP or FSDP2 through torchrun, per-layer activation
checkpointing, JSONL logs and a progress bar.

FSDP2 (`TrainConfig.fsdp`, `echocxr train --fsdp` under torchrun): `fully_shard` on each decoder
layer, on the vision tower and on the root, which is the stage's loss module (`_StageModule`): the
stages call `model.embed` and `model.logits` outside `EchoVLM.forward`, so the root must cover the
whole loss for its parameters (embeddings, head, final norm) to be gathered. Mixed precision on CUDA:
bf16 parameters in compute, fp32 gradient reduction and fp32 master weights; fp32 on CPU (gloo, the
CI test). Its checkpoints are sharded through `torch.distributed.checkpoint` (every rank writes its
shards into the same folder, so several nodes need a shared filesystem) and resume exactly; the
final export gathers the full weights to rank 0 and writes the usual Hugging Face folder. Any stage
that follows the protocol below works the same way (it is not told whether it is sharded).
Checkpoints (`OUT/ckpt/step_XXXXXXX/`) are written to a temp folder and renamed; each holds the
trainable weights, optimizer, scheduler, RNG states, the step (= the data position, see
train/data.py), the stage state and the run's arguments. Frozen weights are not stored: they are
rebuilt from `--init`, which a resumed run must repeat. `--resume` therefore continues exactly: a
run killed and resumed ends with the weights of an uninterrupted one (tests/test_train_loop.py).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from echocxr.distributed import Dist, barrier, init_distributed  # noqa: F401 (used and re-exported)
from echocxr.errors import UserError
from echocxr.train.data import Layout, StudyStream, micro_batches

CKPT_DIR, FINAL_DIR, LOG_FILE, TRAINER_FILE = "ckpt", "final", "log.jsonl", "trainer.pt"
# arguments a resumed run must repeat, or its data stream and weights would differ
RESUME_KEYS = ("stage", "init", "corpus", "batch_size", "grad_accum", "seed", "world", "lora_rank", "fsdp")
RESUME_DEFAULTS = {"fsdp": False}  # a checkpoint from before the key existed was not sharded
SHARDED_DIR = "sharded"  # step_N/sharded: the FSDP2 model and optimizer (torch.distributed.checkpoint)


@dataclass
class TrainConfig:
    steps: int
    batch_size: int = 8  # per process, per micro-batch
    lr: float = 3e-4
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_accum: int = 1
    clip: float = 1.0
    save_every: int = 0  # 0: only the final checkpoint
    keep: int = 2  # intermediate checkpoints kept
    log_every: int = 10
    workers: int = 0
    seed: int = 0
    fsdp: bool = False  # FSDP2 full sharding (needs torchrun)
    activation_checkpointing: bool = False  # recompute each decoder layer's activations in backward

    def __post_init__(self) -> None:
        for k in ("steps", "batch_size", "grad_accum"):
            if getattr(self, k) < 1:
                raise UserError(f"--{k.replace('_', '-')} must be >= 1, not {getattr(self, k)}")
        if self.lr <= 0 or self.warmup < 0 or self.save_every < 0 or self.log_every < 1:
            raise UserError("--lr must be > 0, --warmup and --save-every >= 0, --log-every >= 1")


# -- distributed ----------------------------------------------------------------------------------


# Dist, init_distributed and barrier live in `echocxr.distributed` (decode and eval shard with them too)


def _mean_across(d: Dist, values: list[float]) -> list[float]:
    if d.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / d.world).tolist()


class _StageModule(torch.nn.Module):
    """DDP wraps a module whose forward is the stage's loss, so its gradient hooks fire."""

    def __init__(self, model, stage):
        super().__init__()
        self.model, self.stage = model, stage

    def forward(self, batch, step: int):
        return self.stage.loss(self.model, batch, step)


def apply_fsdp(runner: torch.nn.Module, model, device: torch.device) -> None:
    """FSDP2: `fully_shard` each decoder layer, the vision tower, then the root (`runner`, the stage's
    loss module). bf16 compute / fp32 reduction on CUDA; fp32 on CPU. Parameters become DTensors
    sharded over dim 0 across the ranks (in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()  # fp32: CPU/gloo, where bf16 matmuls would be slow and inexact
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model.visual, mp_policy=mp)
    fully_shard(runner, mp_policy=mp)


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `model` as plain CPU tensors, names unchanged. Sharded
    parameters are all-gathered: a collective, so every rank must call it."""
    from torch.distributed.tensor import DTensor

    out = {}
    for n, t in model.state_dict().items():
        out[n] = (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
    return out


# -- optimizer, schedule, RNG ---------------------------------------------------------------------


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """lr multiplier: linear from 1/warmup to 1 over `warmup` steps, cosine to `min_ratio` at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def make_optimizer(model, cfg: TrainConfig, fused: bool = False):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: every parameter is frozen")
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), **({"fused": True} if fused else {}))
    total = cfg.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, total, cfg.min_lr_ratio))
    return opt, sched


def rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- checkpoints ----------------------------------------------------------------------------------


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def checkpoints(out: Path) -> list[Path]:
    """Complete intermediate checkpoints, oldest first."""
    root = out / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step_") and (p / TRAINER_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def save_checkpoint(out: Path, step: int, state: dict, keep: int) -> Path:
    """Write OUT/ckpt/step_N atomically (temp folder, then rename) and prune to `keep`."""
    root = out / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _publish_checkpoint(out, tmp, final, state, keep)
    return final


def _publish_checkpoint(out: Path, tmp: Path, final: Path, state: dict, keep: int) -> None:
    """Add trainer.pt and args.json to the temp folder, rename it to `final` (a kill leaves either
    the old checkpoint or the new one, never half of one) and prune OUT/ckpt to `keep`."""
    torch.save(state, tmp / TRAINER_FILE)
    (tmp / "args.json").write_text(json.dumps(state["args"], indent=2, default=str))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{path / TRAINER_FILE}: cannot read the checkpoint ({e})") from None


def save_sharded_checkpoint(out: Path, step: int, runner, opt, state: dict, keep: int, d: Dist) -> Path:
    """FSDP2: every rank writes its model and optimizer shards (torch.distributed.checkpoint) into
    the temp folder; rank 0 adds trainer.pt (everything else) and renames it. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = out / CKPT_DIR
    final, tmp = root / f"step_{step:07d}", root / f".tmp-step_{step:07d}"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(d)
    model_sd, optim_sd = get_state_dict(runner, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / SHARDED_DIR)
    barrier(d)
    if d.main:
        _publish_checkpoint(out, tmp, final, state, keep)
    barrier(d)
    return final


def load_sharded_checkpoint(path: Path, runner, opt) -> None:
    """Read this rank's shards of the model and optimizer saved by `save_sharded_checkpoint`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / SHARDED_DIR).is_dir():
        raise UserError(f"{path}: no {SHARDED_DIR}/ folder (this checkpoint was not written with --fsdp)")
    model_sd, optim_sd = get_state_dict(runner, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path / SHARDED_DIR)
    set_state_dict(runner, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def check_resumable(saved: dict, now: dict, where: Path) -> None:
    def get(args, k):
        return args.get(k, RESUME_DEFAULTS.get(k))

    diff = [f"{k}: {get(saved, k)!r} -> {get(now, k)!r}" for k in RESUME_KEYS if get(saved, k) != get(now, k)]
    if diff:
        raise UserError(
            f"{where}: cannot resume with different settings ({'; '.join(diff)}); "
            "repeat the original arguments or choose a new --out"
        )


# -- the loop -------------------------------------------------------------------------------------


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # not on Unix
        return float("nan")


def train(
    model,
    stage,
    stream: StudyStream | None,
    cfg: TrainConfig,
    out: Path,
    *,
    run_args: dict,
    resume: bool = False,
    dist_info: Dist = Dist(),  # noqa: B008 (frozen, immutable)
    progress: bool = True,
) -> dict:
    """Train `model` in place with `stage` for cfg.steps optimizer steps; returns a summary.
    `stream` may be None when the stage does not use the loop's batches."""
    device = model.device
    seed_everything(cfg.seed + dist_info.rank)
    if stage.freeze_vision:
        model.visual.requires_grad_(False)
    model.train()
    for layer in model.layers:
        layer.checkpoint = cfg.activation_checkpointing
    if hasattr(stage, "set_distributed"):  # a stage that shares out work of its own (DCD rollouts)
        stage.set_distributed(dist_info.rank, dist_info.world)
    runner = _StageModule(model, stage)
    if cfg.fsdp:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise UserError("--fsdp needs a process group: run under torchrun")
        apply_fsdp(runner, model, device)
        if dist_info.main:
            from torch.distributed.tensor import DTensor

            n = sum(isinstance(p, DTensor) for p in model.parameters())
            print(
                f"FSDP2: {n} of {len(list(model.parameters()))} parameter tensors sharded over {dist_info.world} ranks"
            )
    # after sharding: the optimizer holds the sharded parameters (fused AdamW: plain CUDA tensors only)
    opt, sched = make_optimizer(model, cfg, fused=device.type == "cuda" and not cfg.fsdp)
    start = 0
    found = checkpoints(out)
    if found and not resume:
        raise UserError(f"{out}: holds checkpoints of an earlier run; pass --resume or choose a new --out")
    if resume and found:
        saved = load_checkpoint(found[-1])
        check_resumable(saved["args"], run_args, found[-1])
        if cfg.fsdp:
            load_sharded_checkpoint(found[-1], runner, opt)
        else:
            missing = set(trainable_state(model)) - set(saved["model"])
            if missing:
                raise UserError(f"{found[-1]}: checkpoint lacks trainable weights {sorted(missing)[:3]}...")
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in saved["model"]:
                        p.copy_(saved["model"][n].to(p.dtype))
            opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        stage.load_state_dict(saved["stage"])
        set_rng_state(saved["rng"][min(dist_info.rank, len(saved["rng"]) - 1)])
        start = saved["step"]
        if dist_info.main:
            print(f"resuming {found[-1]} at step {start}/{cfg.steps}")
    if dist_info.main:
        for tmp in (out / CKPT_DIR).glob(".tmp-*") if (out / CKPT_DIR).is_dir() else []:
            shutil.rmtree(tmp, ignore_errors=True)  # a save that was killed half-way
    barrier(dist_info)  # no rank writes a new temp folder before rank 0 has cleared the old ones

    if dist_info.world > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        runner = DDP(runner, device_ids=ids, broadcast_buffers=False)

    layout = Layout(cfg.batch_size, cfg.grad_accum, dist_info.world, dist_info.rank)
    uses_batches = getattr(stage, "uses_loop_batches", True)
    batches = micro_batches(stream, layout, start, cfg.steps, cfg.workers) if uses_batches else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    log_path = out / LOG_FILE
    bar = None
    if progress and dist_info.main:
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.steps, initial=start, desc=f"train {stage.name}", unit="step", dynamic_ncols=True
        )

    window = {"loss": 0.0, "tokens": 0, "n": 0, "t": time.perf_counter()}
    last: dict = {}
    for step in range(start, cfg.steps):
        logs_acc: dict[str, float] = {}
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            if batches is not None:
                batch = next(batches).to(device)
                window["tokens"] += int(batch.prompt_valid.sum()) + int(batch.response_len.sum())
            else:
                batch = _SizeOnly(cfg.batch_size)
            sync = micro == cfg.grad_accum - 1 or dist_info.world == 1
            ctx = nullcontext()
            if cfg.fsdp:  # reduce-scatter gradients only on the last micro-batch
                runner.set_requires_gradient_sync(sync)
            elif not sync:
                ctx = runner.no_sync()
            with ctx, autocast:
                loss, logs = runner(batch, step)
            if not torch.isfinite(loss):
                raise RuntimeError(f"step {step}: non-finite loss {loss.item()} (lower --lr?)")
            (loss / cfg.grad_accum).backward()
            step_loss += loss.item() / cfg.grad_accum
            for k, v in logs.items():
                logs_acc[k] = logs_acc.get(k, 0.0) + float(v) / cfg.grad_accum
        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip) if cfg.clip > 0 else torch.tensor(0.0)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm over all shards, as a DTensor
            grad_norm = grad_norm.full_tensor()
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window["loss"] += step_loss
        window["n"] += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            mean_loss, tokens = _mean_across(dist_info, [window["loss"] / window["n"], window["tokens"]])
            dt = time.perf_counter() - window["t"]
            last = {
                "step": done,
                "loss": mean_loss,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens * dist_info.world / dt if dt > 0 else None,
                "step_s": dt / window["n"],
                "memory_mb": memory_mb(device),
                **{k: (v if math.isfinite(v) else None) for k, v in logs_acc.items() if k != "loss"},
            }
            if dist_info.main:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"stage": stage.name, **last}) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            window = {"loss": 0.0, "tokens": 0, "n": 0, "t": time.perf_counter()}
        if bar is not None:
            bar.update(1)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            rngs = _gather_rng(dist_info)
            state = {
                "step": done,
                "scheduler": sched.state_dict(),
                "stage": stage.state_dict(),
                "rng": rngs,
                "args": run_args,
                "train": asdict(cfg),
            }
            if cfg.fsdp:  # model and optimizer as shards beside trainer.pt
                save_sharded_checkpoint(out, done, runner, opt, state, cfg.keep, dist_info)
            else:
                if dist_info.main:
                    state.update(model=trainable_state(model), optimizer=opt.state_dict())
                    save_checkpoint(out, done, state, cfg.keep)
                barrier(dist_info)
    if bar is not None:
        bar.close()
    if stream is not None:  # for the checkpoint metadata's `trained_on` (data.image_provenance)
        last = {
            **last,
            "images": stream.image_counts(cfg.steps * cfg.grad_accum * layout.world * cfg.batch_size),
        }
    return last


def _gather_rng(d: Dist) -> list[dict]:
    """Every rank's RNG state (rank order), so a resumed DDP run restores each rank's own."""
    if d.world == 1:
        return [rng_state()]
    import torch.distributed as dist

    states: list = [None] * d.world
    dist.all_gather_object(states, rng_state())
    return states


@dataclass
class _SizeOnly:
    """Stands in for a batch when the stage draws its own (DCD reads only `.size`)."""

    size: int

    def to(self, device):
        return self
