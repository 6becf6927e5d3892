"""`scripts/gpu_check.sh`: one command that measures what issue #15 asks of a GPU, into one JSON file.

Sections (each under its own time guard, so one slow section cannot eat the others' time; the JSON
is rewritten after every section, so a failure or a kill leaves the finished ones on disk):

- `decode_model`: build the Qwen2.5-VL-7B shape (preset `qwen2.5-vl-7b`) with random bf16 weights
  directly on the GPU, one 672 px noise image per row.
- `logits`: our forward against transformers' on the same weights, one study's prompt and 16
  response tokens: top-1 agreement, max/mean abs difference (`bench.rehearse.logits_check`).
- `memory_floor`: the device's copy bandwidth and the weight bytes a decode forward reads
  (`bench.rehearse`): the ms per forward no decoder can beat at batch 1.
- `hf_generate`: transformers' `generate` on the same weights (our `EchoVLM.hf` is the
  transformers model built from our config), batch 1, greedy, `min_new_tokens` = `max_new_tokens`
  = 256 forced new tokens: tokens/s, prefill and ms per forward (`bench.rehearse.hf_generate_speed`,
  after one untimed warm-up call).
- `engine_ar`: our AR engine (`decode.engine.Engine`, CUDA-graph step), batch 1, 256 forced tokens
  (EOS ignored): tokens/s, ms per forward, peak memory (`bench.decode.measure`).
- `engine_onestep`: our one-step decoder, fused block KV cache, block 8, batch 1, 8 and 32.
- `rad_vs_symmetric`: `echocxr bench rad` at V = 1000, R = 300 with FlexAttention on the 7B shape:
  the measured symmetric/RAD step-time ratio against the analytic FLOP ratio.
- `fsdp_smoke`: `echocxr train --fsdp`'s sharding (`train.loop.apply_fsdp`: `fully_shard` per
  decoder layer, the vision tower and the root; bf16 parameters, fp32 reduction on CUDA) in one
  process, the Stage-1 AR loss on two studies, 4 decoder layers of the 7B width (a whole 7B with
  AdamW states would not fit one GPU unsharded), two AdamW steps (one in --smoke).

The measuring functions are `echocxr bench rehearse`'s (the 7B rehearsal on a CPU box), so this
run is that rehearsal's decode half on a GPU. `--smoke` runs the same sections with the `tiny` preset on the CPU (16 new tokens, batches 1 and 2,
V = 64, R = 32, dense attention, gloo): CI checks the JSON fields (tests/test_gpu_check.py). It
installs nothing and needs no network.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import signal
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

SECTIONS = (
    "decode_model",
    "logits",
    "memory_floor",
    "hf_generate",
    "engine_ar",
    "engine_onestep",
    "rad_vs_symmetric",
    "fsdp_smoke",
)
MODEL_SECTIONS = ("logits", "memory_floor", "hf_generate", "engine_ar", "engine_onestep")


@dataclass(frozen=True)
class Plan:
    """Shapes and per-section time limits (seconds) of one mode."""

    preset: str
    device: str
    image_size: int | None  # None: the preset's
    new_tokens: int
    batches: tuple[int, ...]
    rad_vision: int
    rad_response: int
    rad_attention: str
    rad_steps: int
    fsdp_layers: int
    fsdp_steps: int
    limits: dict


GPU = Plan(
    preset="qwen2.5-vl-7b",
    device="cuda",
    image_size=672,
    new_tokens=256,
    batches=(1, 8, 32),
    rad_vision=1000,
    rad_response=300,
    rad_attention="flex",
    rad_steps=3,
    fsdp_layers=4,
    fsdp_steps=2,  # the second step's time is without first-call set-up
    limits={
        "decode_model": 50,
        "logits": 30,
        "memory_floor": 20,
        "hf_generate": 50,
        "engine_ar": 50,
        "engine_onestep": 80,
        "rad_vs_symmetric": 150,  # two torch.compile traces of the 28-layer stack (one per layout)
        "fsdp_smoke": 50,
    },
)
SMOKE = Plan(
    preset="tiny",
    device="cpu",
    image_size=None,
    new_tokens=16,
    batches=(1, 2),
    rad_vision=64,
    rad_response=32,
    rad_attention="dense",
    rad_steps=1,
    fsdp_layers=2,
    fsdp_steps=1,
    limits=dict.fromkeys(SECTIONS, 120),
)


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_guard(seconds: float):
    """Raise SectionTimeout in the main thread after `seconds` (SIGALRM; Unix only). A long C call
    is interrupted only when it returns to Python; the shell script's overall `timeout` backs it."""

    def _raise(signum, frame):
        raise SectionTimeout(f"over its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _peak_mb(device: str) -> float | None:
    import torch

    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return None


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


class Check:
    """Runs the sections in order and keeps the JSON up to date."""

    def __init__(self, plan: Plan, out: Path, budget: float):
        import torch
        import transformers

        self.plan, self.out, self.t_end = plan, out, time.monotonic() + budget
        self.state: dict = {}  # objects shared between sections (the decode model)
        device_name = (
            torch.cuda.get_device_name() if plan.device == "cuda" and torch.cuda.is_available() else "cpu"
        )
        self.report = {
            "gpu_check": 1,
            "mode": "smoke" if plan is SMOKE or plan.device == "cpu" else "gpu",
            "preset": plan.preset,
            "device": device_name,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": round(budget, 1),
            "new_tokens": plan.new_tokens,
            "sections": {},
        }
        self.save()

    def save(self) -> None:
        write_json(self.out, self.report)

    def run(self, name: str, fn) -> None:
        left = self.t_end - time.monotonic()
        limit = min(self.plan.limits[name], left)
        rec: dict = {"limit_s": round(limit, 1)}
        t0 = time.perf_counter()
        if limit < 1:
            rec["status"] = "skipped: no time left in the budget"
        else:
            try:
                _reset_peak(self.plan.device)
                with time_guard(limit):
                    rec.update(fn())
                rec["status"] = "ok"
            except SectionTimeout as e:
                rec["status"] = f"timeout: {e}"
            except Exception as e:  # any failure: record it and go on to the next section
                rec["status"] = f"failed: {type(e).__name__}: {str(e)[:500]}"
                rec["traceback"] = traceback.format_exc(limit=-6)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        self.report["sections"][name] = rec
        self.save()
        print(f"gpu_check: {name}: {rec['status']} ({rec['seconds']} s)", flush=True)

    # -- sections -----------------------------------------------------------------------------------

    def decode_model(self) -> dict:
        from echocxr.bench.decode import load_model

        args = argparse.Namespace(
            ckpt=None,
            random_weights=True,
            preset=self.plan.preset,
            image_size=self.plan.image_size,
            dtype="auto",
            seed=0,
        )
        model, tok, proc, label = load_model(args, self.plan.device)
        self.state.update(model=model, tok=tok, proc=proc)
        return {
            "model": label,
            "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
            "dtype": str(model.dtype).removeprefix("torch."),
            "image_size": model.config.image_size,
            "image_tokens": model.config.image_tokens,
            "peak_mem_mb": _peak_mb(self.plan.device),
        }

    def _batch(self, rows: int):
        from echocxr.batch import Example, collate
        from echocxr.bench.decode import _images

        model, tok, proc = self.state["model"], self.state["tok"], self.state["proc"]
        examples = [Example(_images(1, model.config.image_size, i), "en") for i in range(rows)]
        return collate(examples, tok, proc, model.config.image_tokens).to(self.plan.device)

    def logits(self) -> dict:
        from echocxr.bench.rehearse import logits_check

        return logits_check(self.state["model"], self.state["tok"], self.state["proc"], 16)

    def memory_floor(self) -> dict:
        from echocxr.bench.rehearse import copy_bandwidth_gb_s, decode_weight_bytes

        bw, nbytes = copy_bandwidth_gb_s(self.plan.device), decode_weight_bytes(self.state["model"])
        self.state["floor_ms"] = nbytes / (bw * 1e9) * 1e3
        return {
            "copy_gb_per_s": round(bw, 2),
            "weight_bytes_per_forward": nbytes,
            "floor_ms_per_forward": round(self.state["floor_ms"], 3),
        }

    def hf_generate(self) -> dict:
        from echocxr.bench.rehearse import hf_generate_speed

        batch = self._batch(1)
        hf_generate_speed(self.state["model"], batch, 4)  # warm-up
        _reset_peak(self.plan.device)
        rec = hf_generate_speed(self.state["model"], batch, self.plan.new_tokens)
        return {"batch_size": 1, "prompt_len": batch.prompt_ids.shape[1], **rec, **self._floor(rec)}

    def _floor(self, rec: dict) -> dict:
        floor = self.state.get("floor_ms")
        if not floor or not rec.get("ms_per_forward"):
            return {"peak_mem_mb": _peak_mb(self.plan.device)}
        return {
            "ms_per_forward_vs_floor": round(rec["ms_per_forward"] / floor, 3),
            "peak_mem_mb": _peak_mb(self.plan.device),
        }

    def _engine(self):
        from echocxr.decode.engine import Engine

        if "engine" not in self.state:
            model = self.state["model"]
            model.special = replace(model.special, eos=-1)  # forced length: no row ever stops early
            self.state["engine"] = Engine(
                model, device=self.plan.device, tokenizer=self.state["tok"], processor=self.state["proc"]
            )
        return self.state["engine"]

    def _measure(self, cfg, rows: int) -> dict:
        from echocxr.bench.rehearse import engine_speed

        m = engine_speed(self._engine(), self._batch(rows), cfg, warmup=1, repeats=2)
        keep = (
            "tokens",
            "forwards",
            "prefill_ms",
            "decode_ms",
            "e2e_ms",
            "tokens_per_s_decode",
            "tokens_per_s_e2e",
            "ms_per_forward",
            "mode",
            "kv_allocations",
        )
        return {"batch_size": rows, **{k: m[k] for k in keep}, **self._floor(m)}

    def engine_ar(self) -> dict:
        from echocxr.decode.config import DecodeConfig

        return self._measure(DecodeConfig(decoder="ar", max_new_tokens=self.plan.new_tokens), 1)

    def engine_onestep(self) -> dict:
        from echocxr.decode.config import DecodeConfig

        cfg = DecodeConfig(decoder="onestep", block_size=8, fused=True, max_new_tokens=self.plan.new_tokens)
        runs = {}
        for rows in self.plan.batches:
            _reset_peak(self.plan.device)
            runs[f"batch_{rows}"] = self._measure(cfg, rows)
            self.report["sections"]["engine_onestep"] = {"status": "running", **runs}
            self.save()  # a timeout at batch 32 keeps batches 1 and 8
        ar = self.report["sections"].get("engine_ar", {}).get("tokens_per_s_decode")
        one = runs[f"batch_{self.plan.batches[0]}"]["tokens_per_s_decode"]
        return {**runs, "speedup_vs_ar_batch_1": round(one / ar, 2) if ar and one else None}

    def free_decode_model(self) -> None:
        import gc

        import torch

        self.state.clear()
        gc.collect()
        if self.plan.device == "cuda":
            torch.cuda.empty_cache()

    def rad_vs_symmetric(self) -> dict:
        from echocxr.bench import rad_flops

        self.free_decode_model()
        p = argparse.ArgumentParser()
        rad_flops.add_arguments(p)
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "rad.jsonl"
            argv = ["--shape", self.plan.preset, "--vision", str(self.plan.rad_vision)]
            argv += ["--response", str(self.plan.rad_response), "--device", self.plan.device]
            argv += ["--attention", self.plan.rad_attention, "--steps", str(self.plan.rad_steps)]
            argv += ["--append", str(log)]
            rad_flops.run(p.parse_args(argv))
            rec = json.loads(log.read_text().splitlines()[-1])
        keys = (
            "V",
            "R",
            "block",
            "attention",
            "step_s",
            "time_ratio",
            "formula_linear_ratio",
            "time_vs_flops",
        )
        out = {k: rec.get(k) for k in keys}
        out.update({k: rec[k] for k in rec if k.startswith("flop_ratio_")})
        out["command"] = "echocxr bench rad " + " ".join(argv[:-2])
        out["peak_mem_mb"] = _peak_mb(self.plan.device)
        return out

    def fsdp_smoke(self) -> dict:
        import torch
        import torch.distributed as dist
        from torch import nn

        from echocxr.batch import Example, collate
        from echocxr.bench.decode import SMOKE_TEXTS, _build_on, _images
        from echocxr.model.config import get_preset
        from echocxr.model.image_processing import make_image_processor
        from echocxr.model.tokenizer import train_bpe
        from echocxr.model.vlm import EchoVLM
        from echocxr.train.ar import ARStage
        from echocxr.train.loop import apply_fsdp

        self.free_decode_model()
        cuda = self.plan.device == "cuda"
        cfg = get_preset(self.plan.preset, num_layers=self.plan.fsdp_layers)
        tok = train_bpe(SMOKE_TEXTS, 300)
        with _build_on(self.plan.device, torch.float32):  # fp32 master weights
            model = EchoVLM.from_config(cfg, tok, seed=0)
        stage = ARStage()

        class StageLoss(nn.Module):
            """The stage's loss as the root module's forward (what `echocxr train` shards)."""

            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, batch):
                return stage.loss(self.m, batch, 0)[0]

        examples = [Example(_images(1, cfg.image_size, i), "en", SMOKE_TEXTS[i]) for i in range(2)]
        batch = collate(examples, tok, make_image_processor(cfg.image_size), cfg.image_tokens)
        batch = batch.to(self.plan.device)
        with tempfile.TemporaryDirectory() as tmp:
            dist.init_process_group(
                "nccl" if cuda else "gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1
            )
            try:
                runner = StageLoss(model)
                apply_fsdp(runner, model, torch.device(self.plan.device))  # echocxr train --fsdp's
                opt = torch.optim.AdamW(runner.parameters(), lr=1e-5)
                losses, times = [], []
                for _ in range(self.plan.fsdp_steps):
                    t0 = time.perf_counter()
                    loss = runner(batch)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if cuda:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    losses.append(float(loss.detach()))
            finally:
                dist.destroy_process_group()
        return {
            "what": (
                "train.loop.apply_fsdp (echocxr train --fsdp's fully_shard per decoder layer, vision "
                f"tower and root) in one process, Stage-1 AR loss, {cfg.num_layers} decoder layers of "
                f"the {self.plan.preset} width, 2 studies with one {cfg.image_size} px image, "
                + ("bf16 params / fp32 reduce" if cuda else "fp32 on CPU (gloo)")
                + f", AdamW, {self.plan.fsdp_steps} step(s)"
            ),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "losses": [round(x, 4) for x in losses],
            "finite": all(math.isfinite(x) for x in losses),
            "step_s": [round(t, 3) for t in times],
            "peak_mem_mb": _peak_mb(self.plan.device),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for gpu_check.json (default: $OUT, else runs/gpu_check)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI)")
    p.add_argument("--budget", type=float, default=450, help="seconds for all sections together")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset, in order")
    args = p.parse_args(argv)
    import torch

    plan = SMOKE if args.smoke else GPU
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --smoke for the CPU check")
        return 2
    if args.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    folder = Path(args.out or os.environ.get("OUT") or "runs/gpu_check")
    wanted = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        print(f"gpu_check: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
        return 2
    check = Check(plan, folder / "gpu_check.json", args.budget)
    for name in SECTIONS:
        if name not in wanted:
            continue
        needs_model = name in MODEL_SECTIONS
        if needs_model and "model" not in check.state:
            check.report["sections"][name] = {"status": "skipped: the decode model was not built"}
            check.save()
            continue
        check.run(name, getattr(check, name))
    print(f"gpu_check: wrote {folder / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
