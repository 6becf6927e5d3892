"""`echocxr bench rehearse --out DIR`: a user's Qwen2.5-VL-7B run end to end, random weights, one JSON line.

Each step runs in its own child process, so its wall time and peak RSS (`os.wait4`) are its own:

1. `build`: a Hugging Face folder of the shape (`bench.hf_folder`: config, sharded safetensors, the
   Qwen2.5-VL tokenizer ids, a processor pinned to the shape's image side) and a one-study corpus.
2. `check`: the folder loaded as `--init DIR` loads it (`EchoVLM.from_pretrained`: mask token
   added, embeddings resized, the processor's pixel limits read); logits of our forward against
   transformers' on the same weights (one copy); the machine's copy bandwidth and the memory floor
   (weight bytes a decode forward reads / bandwidth); transformers `generate` and our decoders at
   each batch size (`bench.decode.measure`).
3. `train_ar`, `train_rad`, `train_dcd`: `echocxr train --lora-rank R --activation-checkpointing`,
   one step on the study; the loss, and the merged export compared with the folder (LoRA targets
   changed, everything else bit-identical). DCD's teacher is the student with adapters off.
4. `serve`: `echocxr serve` on the DCD export (the merged export reloaded) answers one streamed
   /v1/chat/completions request; time to the first block.

Everything is written under --out: OUT/checkpoint, OUT/data, OUT/train_*, OUT/steps/*.json and
OUT/rehearse.json (the line printed). Weight files of the training exports are deleted once
checked (--keep-exports keeps them; the 7B shape writes 16.6 GB each).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from echocxr.errors import UserError

STEPS = ("build", "check", "train_ar", "train_rad", "train_dcd", "serve")
DECODERS = {  # name -> DecodeConfig fields (None: transformers generate)
    "hf_generate": None,
    "ar": {"decoder": "ar"},
    "onestep_fused_b8": {"decoder": "onestep", "block_size": 8, "fused": True},
    "onestep_vanilla_b8": {"decoder": "onestep", "block_size": 8, "fused": False},
    "block_k8_b8": {"decoder": "block", "block_size": 8, "steps": 8},
}
QWEN_VOCAB = 152064  # Qwen2.5-VL's embedding rows (the tokenizer has 151665 ids)
REPORT = (
    "Findings: The heart is normal in size. No pleural effusion. No pneumothorax.\nImpression: Normal chest."
)
TARGETS = {  # name -> (JSON path of the value, comparison, bound)
    "logits_top1_bf16": (("check", "logits", "top1_agreement"), ">=", 0.995),
    "ar_vs_hf_generate_b1": (("check", "ratios", "ar_vs_hf_generate_b1"), ">=", 1.0),
    "ar_ms_per_forward_vs_floor": (("check", "ratios", "ar_ms_per_forward_vs_floor_b1"), "<=", 1.3),
    "fused_vs_ar_b1": (("check", "ratios", "onestep_fused_b8_vs_ar_b1"), ">=", 6.5),
    "fused_b8_vs_b1": (("check", "ratios", "onestep_fused_b8_large_batch_vs_batch1"), ">=", 3.5),
    "peak_rss_gb": (("peak_rss_gb",), "<=", 22.0),
    "total_minutes": (("total_minutes",), "<=", 25.0),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for every file the rehearsal writes")
    p.add_argument("--shape", default="qwen2.5-vl-7b", help="model preset shape (tiny for CI)")
    p.add_argument("--layers", type=int, help="reduced depth: decoder and vision layers (same width)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--new-tokens", type=int, default=16, help="response tokens: logits, decoders, training")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument(
        "--large-batch-decoders",
        default="onestep_fused_b8",
        help="decoders also run at batch sizes above 1 ('all': every one; each costs a batch prefill)",
    )
    p.add_argument("--warmup", type=int, default=0, help="untimed decode runs per measurement")
    p.add_argument("--repeats", type=int, default=1, help="timed decode runs per measurement")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset, in order")
    p.add_argument("--keep-exports", action="store_true", help="keep the training exports' weights")
    p.add_argument("--threads", type=int, help="torch CPU threads in every step")
    p.add_argument("--step", choices=("build", "check"), help=argparse.SUPPRESS)  # one step, in this process


# -- the shape and the files -------------------------------------------------------------------------


def model_config(args):
    """The preset shape with Qwen2.5-VL's vocabulary, optionally at reduced depth."""
    from dataclasses import replace

    from echocxr.model.config import get_preset

    cfg = get_preset(args.shape)
    cfg = replace(cfg, vocab_size=max(cfg.vocab_size, QWEN_VOCAB))
    if args.layers:
        full = [i for i in cfg.fullatt_block_indexes if i < args.layers] or [args.layers - 1]
        cfg = replace(
            cfg,
            num_layers=min(args.layers, cfg.num_layers),
            vision_depth=min(args.layers, cfg.vision_depth),
            fullatt_block_indexes=tuple(full),
            name=f"{cfg.name}-{args.layers}layers",
        )
    return cfg


def paths(out: Path) -> dict:
    return {
        "ckpt": out / "checkpoint",
        "corpus": out / "data" / "corpus.jsonl",
        "image": out / "data" / "study.png",
        "steps": out / "steps",
    }


def write_study(out: Path, side: int) -> None:
    """One training study: a side x side noise radiograph and its report (a one-line corpus)."""
    from echocxr.bench.decode import _images
    from echocxr.data.records import ImageRef, Record

    p = paths(out)
    p["image"].parent.mkdir(parents=True, exist_ok=True)
    _images(1, side, 0)[0].save(p["image"])
    findings, impression = REPORT.removeprefix("Findings: ").split("\nImpression: ")
    rec = Record(
        record_id="rehearsal:1",
        study_id="rehearsal:1",
        source="iu",
        images=[ImageRef(p["image"].name, "PA")],
        findings=findings,
        impression=impression,
    )
    p["corpus"].write_text(rec.to_json() + "\n")


# -- measurements shared with scripts/gpu_check.sh ----------------------------------------------------


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth_gb_s(device: str, nbytes: int = 2**30, repeats: int = 5) -> float:
    """Best of `repeats` copies of an nbytes buffer: (bytes read + bytes written) / s, in GB/s."""
    import torch

    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode forward reads: every decoder layer, the final norm, the LM head
    (the embedding reads only the new tokens' rows; the vision tower runs in the prefill only)."""
    mods = [model.lm.layers, model.lm.norm, model.hf.lm_head]
    return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())


def hf_generate_speed(model, batch, new_tokens: int) -> dict:
    """transformers `generate` (greedy, exactly new_tokens forced) on `model.hf`; the end of the
    prefill is when the first logits reach the logits processors."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    ids, stamp = batch.prompt_ids, Stamp()
    kw = dict(
        input_ids=ids,
        attention_mask=batch.prompt_valid.long(),
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.grid_thw,
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=model.special.pad,
        logits_processor=LogitsProcessorList([stamp]),
    )
    sync(ids.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        try:  # transformers 5 takes the image slots as mm_token_type_ids
            out = model.hf.generate(mm_token_type_ids=(ids == model.special.image).int(), **kw)
        except (TypeError, ValueError):  # older: derived from input_ids
            stamp.times.clear()
            t0 = time.perf_counter()
            out = model.hf.generate(**kw)
    sync(ids.device)
    t1 = time.perf_counter()
    made = out.shape[1] - ids.shape[1]
    prefill, decode = stamp.times[0] - t0, t1 - stamp.times[0]
    forwards = made - 1  # the prefill made the first token
    return {
        "tokens": made * ids.shape[0],
        "forwards": forwards,
        "prefill_ms": round(prefill * 1e3, 3),
        "decode_ms": round(decode * 1e3, 3),
        "e2e_ms": round((t1 - t0) * 1e3, 3),
        "tokens_per_s_decode": round(made * ids.shape[0] / decode, 2) if decode > 0 else None,
        "tokens_per_s_e2e": round(made * ids.shape[0] / (t1 - t0), 2),
        "ms_per_forward": round(decode * 1e3 / forwards, 3) if forwards else None,
        "forwards_per_token": round(forwards / made, 4),
    }


def engine_speed(engine, batch, cfg, *, warmup: int, repeats: int) -> dict:
    """`bench.decode.measure` of one decoder (its fields, peak RSS or CUDA memory included)."""
    from echocxr.bench.decode import measure

    m = measure(engine, batch, cfg, warmup=warmup, repeats=repeats)
    m.pop("e2e_ms_all", None)
    return m


def noise_batch(model, tok, proc, rows: int, response: list[int] | None = None):
    """`rows` studies of one noise image at the model's side (the decoders' cost ignores pixels)."""
    import torch

    from echocxr.batch import Example, collate
    from echocxr.bench.decode import _images

    side = model.config.image_size
    batch = collate(
        [Example(_images(1, side, i), "en") for i in range(rows)], tok, proc, model.config.image_tokens
    )
    if response is not None:
        batch.response_ids = torch.tensor([response] * rows)
    return batch.to(model.device)


def logits_check(model, tok, proc, new_tokens: int) -> dict:
    """Our forward vs transformers' Qwen2.5-VL forward (`model.hf`, the same weights) over one study's
    prompt and new_tokens response tokens: top-1 agreement and abs differences at every position."""
    import torch

    from echocxr.model.prompt import response_ids

    resp = response_ids(tok, REPORT)[:new_tokens]
    b = noise_batch(model, tok, proc, 1)
    ids = torch.cat([b.prompt_ids, torch.tensor([resp], device=model.device)], 1)
    with torch.no_grad():
        t0 = time.perf_counter()
        kw = {"mm_token_type_ids": (ids == model.special.image).int()}
        try:
            ref = model.hf(input_ids=ids, pixel_values=b.pixel_values, image_grid_thw=b.grid_thw, **kw).logits
        except TypeError:  # older transformers derive the image slots from input_ids
            ref = model.hf(input_ids=ids, pixel_values=b.pixel_values, image_grid_thw=b.grid_thw).logits
        sync(model.device)
        t_hf = time.perf_counter() - t0
        t0 = time.perf_counter()
        x = model.embed(ids, b.pixel_values, b.grid_thw)
        ours = model.logits(model(x, model.positions(ids, b.grid_thw)))
        sync(model.device)
        t_ours = time.perf_counter() - t0
    ref, ours = ref[0], ours[0]  # [S, V] in the model's dtype; compared 64 positions at a time in fp32
    agree, gap, dmax, dsum = [], [], [], 0.0
    for r, o in zip(ref.split(64), ours.split(64), strict=True):
        r, o = r.float(), o.float()
        d = (o - r).abs()
        agree.append(r.argmax(-1) == o.argmax(-1))
        two = r.topk(2, -1).values
        gap.append(two[:, 0] - two[:, 1])  # how far transformers' winner leads its runner-up
        dmax.append(d.amax(-1))
        dsum += d.sum().item()
    agree, gap, dmax = torch.cat(agree), torch.cat(gap), torch.cat(dmax)
    P = b.prompt_ids.shape[1]
    return {
        "positions": int(ids.shape[1]),
        "prompt_len": P,
        "response_tokens": len(resp),
        "dtype": str(model.dtype).removeprefix("torch."),
        "top1_agreement": round(agree.float().mean().item(), 5),
        "top1_agreement_response": round(agree[P - 1 :].float().mean().item(), 5),
        "disagreements": int((~agree).sum()),
        "max_abs_diff": round(dmax.max().item(), 5),
        "mean_abs_diff": round(dsum / ref.numel(), 6),
        "median_top1_gap": round(gap.median().item(), 5),
        # transformers' lead of its top-1 over its top-2 where the two disagree, and how many
        # positions lead by less than the largest difference measured (a coin flip in this dtype)
        "disagreement_gaps": [round(g, 5) for g in gap[~agree].tolist()[:20]],
        "positions_with_gap_below_max_diff": int((gap < dmax.max()).sum()),
        "hf_forward_s": round(t_hf, 2),
        "ours_forward_s": round(t_ours, 2),
    }


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the in-process steps ---------------------------------------------------------------------------


def step_build(args, out: Path) -> dict:
    import torch

    from echocxr.bench.hf_folder import write_random_checkpoint

    cfg = model_config(args)
    p = paths(out)
    shutil.rmtree(p["ckpt"], ignore_errors=True)
    rec = write_random_checkpoint(p["ckpt"], cfg, dtype=getattr(torch, args.dtype))
    write_study(out, cfg.image_size)
    return {"model": cfg.name, "image_size": cfg.image_size, **rec}


def _save_step(out: Path, step: str, rec: dict) -> None:
    """OUT/steps/STEP.json, rewritten as the step goes (a killed step leaves what it measured)."""
    folder = paths(out)["steps"]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{step}.json.tmp"
    tmp.write_text(json.dumps(rec, indent=2))
    os.replace(tmp, folder / f"{step}.json")


def step_check(args, out: Path) -> dict:
    import dataclasses

    import torch
    import transformers

    from echocxr.decode.config import DecodeConfig
    from echocxr.decode.engine import Engine
    from echocxr.model.vlm import EchoVLM

    ckpt = paths(out)["ckpt"]
    disk_vocab = json.loads((ckpt / "config.json").read_text())["text_config"]["vocab_size"]
    t0 = time.perf_counter()
    # what `echocxr train --init DIR` runs (train.cli.build_model) for a folder
    model, tok, proc, _ = EchoVLM.from_pretrained(ckpt, dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()
    rec: dict = {
        "load": {
            "seconds": round(time.perf_counter() - t0, 2),
            "vocab_on_disk": disk_vocab,
            "vocab_loaded": model.vocab_size,
            "tokenizer_len": len(tok),
            "mask_id": model.special.mask,
            "special_ids": dataclasses.asdict(model.special),
            "image_size": model.config.image_size,
            "image_tokens": model.config.image_tokens,
            "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
            "peak_rss_mb": round(_peak_rss_mb(), 1),
        },
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }
    rec["logits"] = logits_check(model, tok, proc, args.new_tokens)
    _save_step(out, "check", rec)
    bw = copy_bandwidth_gb_s(args.device)
    weight_bytes = decode_weight_bytes(model)
    floor_ms = weight_bytes / (bw * 1e9) * 1e3
    rec["memory_floor"] = {
        "copy_gb_per_s": round(bw, 2),
        "weight_bytes_per_forward": weight_bytes,
        "floor_ms_per_forward": round(floor_ms, 2),
    }
    model.special = dataclasses.replace(model.special, eos=-1)  # random weights: every row runs to the end
    engine = Engine(model, device=args.device, tokenizer=tok, processor=proc)
    large = set(DECODERS) if args.large_batch_decoders == "all" else set(args.large_batch_decoders.split(","))
    speed: dict = {}
    for rows in [int(x) for x in args.batch_sizes.split(",")]:
        batch = noise_batch(model, tok, proc, rows)
        for name, fields in DECODERS.items():
            if rows > 1 and name not in large:
                continue
            if fields is None:
                m = hf_generate_speed(model, batch, args.new_tokens)
                m["peak_mem_mb"] = round(_peak_rss_mb(), 1)
            else:
                cfg = DecodeConfig(max_new_tokens=args.new_tokens, **fields)
                m = engine_speed(engine, batch, cfg, warmup=args.warmup, repeats=args.repeats)
            if m.get("ms_per_forward"):
                m["ms_per_forward_vs_floor"] = round(m["ms_per_forward"] / floor_ms, 3)
            speed[f"{name}_batch{rows}"] = {"batch_size": rows, "prompt_len": batch.prompt_ids.shape[1], **m}
            print(f"rehearse check: {name} batch {rows}: {m.get('tokens_per_s_decode')} tok/s", flush=True)
            rec.update(speed=speed, ratios=ratios(speed))
            _save_step(out, "check", rec)
    return rec


def ratios(speed: dict) -> dict:
    """The targets' ratios from decode tokens/s and ms per forward (None where a run is missing)."""

    def tps(key):
        return (speed.get(key) or {}).get("tokens_per_s_decode")

    def div(a, b):
        return round(a / b, 3) if a and b else None

    big = max((v["batch_size"] for v in speed.values()), default=1)
    if big == 1:  # no large batch ran: its ratios are missing, not 1
        big = None
    return {
        "large_batch": big,
        "ar_vs_hf_generate_b1": div(tps("ar_batch1"), tps("hf_generate_batch1")),
        "ar_ms_per_forward_vs_floor_b1": (speed.get("ar_batch1") or {}).get("ms_per_forward_vs_floor"),
        "onestep_fused_b8_vs_ar_b1": div(tps("onestep_fused_b8_batch1"), tps("ar_batch1")),
        "onestep_vanilla_b8_vs_ar_b1": div(tps("onestep_vanilla_b8_batch1"), tps("ar_batch1")),
        "block_k8_b8_vs_ar_b1": div(tps("block_k8_b8_batch1"), tps("ar_batch1")),
        "onestep_fused_b8_large_batch_vs_batch1": div(
            tps(f"onestep_fused_b8_batch{big}"), tps("onestep_fused_b8_batch1")
        ),
        "ar_large_batch_vs_batch1": div(tps(f"ar_batch{big}"), tps("ar_batch1")),
        "hf_generate_large_batch_vs_batch1": div(tps(f"hf_generate_batch{big}"), tps("hf_generate_batch1")),
    }


# -- child processes ------------------------------------------------------------------------------


def child(argv: list[str], log: Path, timeout: float, env=None) -> dict:
    """Run argv to completion -> rc, seconds and the child's peak RSS (its own rusage: os.wait4)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
        rc, usage = _wait(p, timeout)
    return {
        "rc": rc,
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }


def _wait(p: subprocess.Popen, timeout: float):
    """os.wait4 with a deadline (SIGKILL after it): -> (returncode, rusage)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return p.returncode, usage
        if time.monotonic() > deadline:
            p.kill()
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = -9
            return -9, usage
        time.sleep(0.2)


def _env(args) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    src = str(Path(__file__).resolve().parents[2])  # this checkout's src/, for children run by path
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _own_argv(args, step: str) -> list[str]:
    argv = [sys.executable, "-m", "echocxr", "bench", "rehearse", "--step", step, "--out", str(args.out)]
    argv += ["--shape", args.shape, "--device", args.device, "--dtype", args.dtype]
    argv += ["--new-tokens", str(args.new_tokens), "--batch-sizes", args.batch_sizes]
    argv += ["--large-batch-decoders", args.large_batch_decoders]
    argv += ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if args.layers:
        argv += ["--layers", str(args.layers)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def train_argv(args, stage: str, out: Path) -> list[str]:
    p = paths(out)
    argv = [sys.executable, "-m", "echocxr", "train", "--stage", stage, "--init", str(p["ckpt"])]
    argv += ["--corpus", str(p["corpus"]), "--out", str(out / f"train_{stage}"), "--steps", "1"]
    argv += ["--batch-size", "1", "--lora-rank", str(args.lora_rank), "--activation-checkpointing"]
    argv += ["--dtype", args.dtype, "--save-dtype", args.dtype, "--warmup", "0", "--log-every", "1"]
    argv += ["--max-response", str(args.new_tokens), "--no-progress", "--device", args.device]
    argv += ["--image-source", "real", "--seed", "0"]
    if stage == "ar":
        argv += ["--freeze-vision"]
    if stage == "rad":
        argv += ["--block-size", "8"]
    if stage == "dcd":
        argv += ["--block-size", "8", "--distill-studies", "1", "--collect-batch", "1"]
        argv += ["--max-new-tokens", str(args.new_tokens)]
    return argv


def _tensor(folder: Path, suffix: str):
    """The tensor whose name ends with `suffix` in a safetensors folder (either naming scheme)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    files = files or [f.name for f in folder.glob("*.safetensors")]
    for f in files:
        with safe_open(str(folder / f), "pt") as g:
            for k in g.keys():
                if k.endswith(suffix):
                    return g.get_tensor(k)
    raise KeyError(f"{folder}: no tensor named *{suffix}")


def export_changes(base: Path, export: Path, n_layers: int) -> dict:
    """Which weights the merged export changed: LoRA targets (first layer's q_proj, last layer's
    down_proj) should, the rest (a layer norm, the vision patch embedding) must not."""
    last = n_layers - 1
    out = {}
    for key, suffix in (
        ("q_proj_layer0", "layers.0.self_attn.q_proj.weight"),
        (f"down_proj_layer{last}", f"layers.{last}.mlp.down_proj.weight"),
        ("input_layernorm_layer0", "layers.0.input_layernorm.weight"),
        ("vision_patch_embed", "patch_embed.proj.weight"),
    ):
        a, b = _tensor(base, suffix), _tensor(export, suffix)
        changed = a != b
        out[key] = {
            "fraction_changed": round(changed.float().mean().item(), 6),
            "max_abs_change": round((a.float() - b.float()).abs().max().item(), 8),
        }
    out["adapters_changed"] = all(
        out[k]["fraction_changed"] > 0 for k in ("q_proj_layer0", f"down_proj_layer{last}")
    )
    out["frozen_unchanged"] = all(
        out[k]["fraction_changed"] == 0 for k in ("input_layernorm_layer0", "vision_patch_embed")
    )
    return out


def train_step(args, out: Path, stage: str, env: dict) -> dict:
    run_dir = out / f"train_{stage}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    argv = train_argv(args, stage, out)
    rec = child(argv, run_dir / "stdout.log", timeout=1800, env=env)
    rec["command"] = " ".join(["echocxr", *argv[3:]])
    log = run_dir / "log.jsonl"
    if rec["rc"] != 0 or not log.is_file():
        rec["error"] = (run_dir / "stdout.log").read_text()[-2000:]
        return rec
    last = json.loads(log.read_text().splitlines()[-1])
    rec.update(
        loss=last["loss"],
        loss_finite=math.isfinite(last["loss"]),
        step_s=round(last["step_s"], 2),
        logs={k: v for k, v in last.items() if k not in ("stage", "loss", "step_s", "memory_mb")},
    )
    cfg = model_config(args)
    rec["export"] = export_changes(paths(out)["ckpt"], run_dir / "final", cfg.num_layers)
    text = (run_dir / "stdout.log").read_text()
    rec["trainable"] = next((ln.strip() for ln in text.splitlines() if "parameters trainable" in ln), None)
    if stage == "dcd":
        rec["dcd_round"] = next((ln.strip() for ln in text.splitlines() if ln.startswith("dcd round")), None)
    elif not args.keep_exports:
        for f in (run_dir / "final").glob("*.safetensors"):
            f.unlink()
        rec["export_weights_deleted"] = True
    return rec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_step(args, out: Path, env: dict) -> dict:
    """`echocxr serve` on the DCD export; one streamed chat completion; SIGINT; its rusage."""
    import base64

    import httpx

    ckpt = out / "train_dcd" / "final"
    port = _free_port()
    argv = [sys.executable, "-m", "echocxr", "serve", "--ckpt", str(ckpt), "--port", str(port)]
    argv += ["--device", args.device, "--max-tokens", str(args.new_tokens)]
    rec: dict = {"command": " ".join(["echocxr", *argv[3:]])}
    t0 = time.perf_counter()
    log = open(out / "steps" / "serve.log", "w")
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"the server exited ({p.returncode}); see {out / 'steps' / 'serve.log'}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > 900:
                raise RuntimeError("the server did not start within 900 s")
            time.sleep(1)
        rec["startup_s"] = round(time.perf_counter() - t0, 2)
        rec["health"] = httpx.get(url + "/health", timeout=5).json()
        png = base64.b64encode(paths(out)["image"].read_bytes()).decode()
        body = {
            "model": "echocxr",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}],
                }
            ],
            "stream": True,
            "max_tokens": args.new_tokens,
        }
        blocks, text, first, t_req = [], "", None, time.perf_counter()
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=900) as r:
            rec["status_code"] = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                if "error" in msg:
                    rec["error"] = msg["error"]
                    continue
                if "elapsed_ms" in (msg.get("echocxr") or {}):  # one chunk per committed block
                    first = first or time.perf_counter() - t_req
                    blocks.append(msg["echocxr"])
                text += msg["choices"][0]["delta"].get("content", "") if msg.get("choices") else ""
        rec.update(
            sse_blocks=len(blocks),
            time_to_first_block_s=round(first, 3) if first else None,
            request_s=round(time.perf_counter() - t_req, 3),
            server_block_ms=[b["elapsed_ms"] for b in blocks],
            text_chars=len(text),
        )
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
        rc, usage = _wait(p, 120)
        log.close()
    rec.update(
        rc=rc, seconds=round(time.perf_counter() - t0, 2), peak_rss_mb=round(usage.ru_maxrss / 1024, 1)
    )
    if not args.keep_exports:
        for f in ckpt.glob("*.safetensors"):
            f.unlink()
        rec["export_weights_deleted"] = True
    return rec


# -- the whole rehearsal ----------------------------------------------------------------------------


def _get(rec: dict, path: tuple):
    for k in path:
        rec = rec.get(k) if isinstance(rec, dict) else None
    return rec


def targets(report: dict) -> dict:
    out = {}
    for name, (path, op, bound) in TARGETS.items():
        value = _get(report, path)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[name] = {"value": value, "target": f"{op} {bound}", "met": met}
    return out


def machine() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def finish(report: dict, t0: float, *, complete: bool) -> str:
    """Totals and targets into the report; OUT/rehearse.json rewritten (after every step)."""
    peaks = [r["peak_rss_mb"] for s, r in report.items() if s in STEPS and r.get("peak_rss_mb")]
    report["peak_rss_gb"] = round(max(peaks) / 1024, 2) if peaks else None
    report["total_minutes"] = round((time.perf_counter() - t0) / 60, 2)
    report["complete"] = complete
    report["targets"] = targets(report)
    line = json.dumps(report, ensure_ascii=False)
    out = Path(report["out"])
    tmp = out / ".rehearse.json.tmp"
    tmp.write_text(line + "\n")
    os.replace(tmp, out / "rehearse.json")
    return line


def run(args) -> int:
    out = Path(args.out).resolve()
    args.out = str(out)
    if args.step:  # one in-process step (a child of the rehearsal)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        rec = {"build": step_build, "check": step_check}[args.step](args, out)
        rec["peak_rss_mb_inside"] = round(_peak_rss_mb(), 1)
        _save_step(out, args.step, rec)
        return 0
    wanted = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(wanted) - set(STEPS))
    if unknown:
        raise UserError(f"--steps: unknown step(s) {unknown}; choose from {list(STEPS)}")
    model_config(args)  # an unknown --shape fails here
    steps_dir = paths(out)["steps"]
    steps_dir.mkdir(parents=True, exist_ok=True)
    env, t0 = _env(args), time.perf_counter()
    report: dict = {
        "bench": "rehearse",
        "out": str(out),
        "shape": model_config(args).name,
        "device": args.device,
        "dtype": args.dtype,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "echocxr bench rehearse "
        + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "rehearse"] else []),
        "new_tokens": args.new_tokens,
        "lora_rank": args.lora_rank,
    }
    if "build" not in wanted and (steps_dir / "build.json").is_file():  # a folder built by an earlier run
        report["build"] = {"reused": True, **json.loads((steps_dir / "build.json").read_text())}
    started = time.time()
    for step in wanted:
        print(f"rehearse: {step} ...", flush=True)
        if step in ("build", "check"):
            rec = child(_own_argv(args, step), steps_dir / f"{step}.log", timeout=3600, env=env)
            result = steps_dir / f"{step}.json"
            if result.is_file() and result.stat().st_mtime >= started:  # what it measured, even if it failed
                rec.update(json.loads(result.read_text()))
            if rec["rc"] != 0:
                rec["error"] = (steps_dir / f"{step}.log").read_text()[-2000:]
        elif step == "serve":
            try:
                rec = serve_step(args, out, env)
            except Exception as e:  # recorded; the report is still written
                rec = {"error": f"{type(e).__name__}: {e}"}
        else:
            rec = train_step(args, out, step.removeprefix("train_"), env)
        report[step] = rec
        finish(report, t0, complete=False)
        print(
            f"rehearse: {step}: rc={rec.get('rc')} {rec.get('seconds')} s, peak RSS {rec.get('peak_rss_mb')} MB",
            flush=True,
        )
    line = finish(report, t0, complete=True)
    print(line, flush=True)
    failed = [s for s in wanted if report[s].get("rc") not in (0, None) or "error" in report[s]]
    return 1 if failed else 0
