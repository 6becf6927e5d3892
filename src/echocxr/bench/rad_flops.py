"""`echocxr bench rad`: RAD against symmetric duplication, per training step of the LM decoder.

Layouts (V vision+prefix tokens, R response tokens, block B):
- RAD:       [prefix V | noisy R | clean R]           S = V + 2R   (masks.rad)
- symmetric: [noisy (V + R) | clean (V + R)]          S = 2(V + R) (masks.symmetric)

Analytic FLOPs of one step (forward + backward = 3x forward) of the decoder stack:
- linear layers (q, k, v, o, MLP): 2 * n_linear_params * S per forward, so the RAD/symmetric
  ratio of this term is 2(V + R) / (V + 2R);
- attention (QK^T and AV): 4 * H * head_dim per attended (q, k) pair per layer, counted three ways:
  `exact` (only pairs the mask allows), `tiles` (FlexAttention work: every 128 x 128 tile that holds
  an allowed pair), `dense` (S^2 pairs: what SDPA with a dense boolean mask computes);
- the LM head on the R supervised response positions (the same for both layouts).

Measured: the median wall time of forward + backward of the decoder layers over random input
embeddings of the right length (images do not change the decoder's cost; the vision tower is the
same in both layouts and is left out), alternating RAD and symmetric steps so that load drift on a
shared machine hits both. Prints one JSON line per vision length.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from echocxr.errors import UserError
from echocxr.model.denoise import BLOCK_SIZE
from echocxr.model.masks import dense, duplicated_rule, rad_rule, symmetric_rule

FLEX_TILE = 128  # FlexAttention's default block size (BlockMask.BLOCK_SIZE)


@dataclass(frozen=True)
class Layout:
    name: str
    seq: int  # S
    response_slots: tuple[int, int]  # [start, end) of the noisy response copy (the supervised slots)
    rule: object

    def mask(self, device=None) -> torch.Tensor:
        return dense(self.rule, self.seq, self.seq, device=device)


def layouts(V: int, R: int, block: int) -> tuple[Layout, Layout]:
    rad = Layout("rad", V + 2 * R, (V, V + R), rad_rule(V, R, block))
    L = V + R
    # bd3lms layout: the block grid starts at the sequence's first token, so V need not be a multiple
    # of B (the response's blocks are then offset from the grid; the cost is the same).
    sym = Layout("symmetric", 2 * L, (V, L), symmetric_rule(L, block))
    return rad, sym


def duplicated_layout(V: int, R: int, block: int) -> Layout:
    """The layout `echocxr train --stage rad --layout duplicated` trains (`masks.duplicated`):
    [prefix | noisy | prefix | clean], the same length as the symmetric one."""
    return Layout("duplicated", 2 * (V + R), (V, V + R), duplicated_rule(V, R, block))


def attention_pairs(mask: torch.Tensor, tile: int = FLEX_TILE) -> dict[str, int]:
    S = mask.shape[0]
    n = -(-S // tile)
    padded = torch.zeros(n * tile, n * tile, dtype=torch.bool)
    padded[:S, :S] = mask
    tiles = padded.view(n, tile, n, tile).any(3).any(1)
    return {"exact": int(mask.sum()), "tiles": int(tiles.sum()) * tile * tile, "dense": S * S}


def analytic_flops(cfg, layout: Layout, R: int) -> dict:
    """Forward + backward FLOPs of one step for one sequence."""
    D, ffn, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    kv = cfg.num_kv_heads * cfg.head_dim
    linear_params = L * (2 * D * D + 2 * D * kv + 3 * D * ffn)
    S = layout.seq
    pairs = attention_pairs(layout.mask())
    per_pair = 4 * cfg.num_heads * cfg.head_dim * L
    out = {
        "seq": S,
        "linear": 3 * 2 * linear_params * S,
        "head": 3 * 2 * D * cfg.vocab_size * R,
        "attention_pairs": pairs,
    }
    for kind, n in pairs.items():
        out[f"attention_{kind}"] = 3 * per_pair * n
        out[f"total_{kind}"] = out["linear"] + out["head"] + out[f"attention_{kind}"]
    return out


def _step_inputs(model, layout: Layout, V: int, R: int, batch: int, device, dtype, flex: bool):
    S = layout.seq
    if layout.name == "rad":
        p = torch.cat([torch.arange(V + R), torch.arange(V, V + R)])  # the noisy copy shares positions
    elif layout.name == "duplicated":  # each copy: its prefix and response positions
        p = torch.cat([torch.arange(V + R), torch.arange(V + R)])
    else:
        p = torch.cat([torch.arange(V + R), torch.arange(V + R)])
    pos = p.to(device)[None, None].expand(3, batch, S)
    if flex:
        from echocxr.model.masks import flex_block_mask

        mask = flex_block_mask(layout.rule, S, S, device=device)  # no padding: one mask for all rows
    else:
        mask = layout.mask(device)[None, None]
    x = torch.randn(batch, S, model.lm.config.hidden_size, device=device, dtype=dtype)
    target = torch.randint(model.vocab_size, (batch, R), device=device)
    return x, pos, mask, target


def time_steps(model, forward, inputs: dict, layout_names, steps: int, warmup: int, device) -> dict:
    """Median seconds of forward + backward per layout, steps interleaved across layouts."""
    times = {n: [] for n in layout_names}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup + steps):
        for name in layout_names:
            x, pos, mask, target, (a, b) = inputs[name]
            sync()
            t0 = time.perf_counter()
            h = forward(x.requires_grad_(), pos, mask)
            logits = model.logits(h[:, a:b]).float()
            F.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
            x.grad = None
    return {n: statistics.median(t) for n, t in times.items()}


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default=None, help="model shape with random weights (tiny, small, ...)")
    parser.add_argument("--shape", default=None, help="alias of --preset (e.g. qwen2.5-vl-7b)")
    parser.add_argument(
        "--vision", default="500,1000,2500", help="comma-separated prefix (vision) lengths V in tokens"
    )
    parser.add_argument("--response", type=int, default=300, help="response length R in tokens")
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per layout and length")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default=None, help="default: bf16 on CUDA"
    )
    parser.add_argument(
        "--attention",
        choices=("dense", "flex"),
        default=None,
        help="dense: SDPA with a boolean mask (full S^2 work); flex: compiled FlexAttention with block "
        "sparsity (CUDA). Default: flex on CUDA, dense on CPU",
    )
    parser.add_argument("--no-measure", action="store_true", help="analytic FLOPs only")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--append", default=None, help="also append the JSON lines to this file")


def _build(preset: str, device, dtype):
    from echocxr.model.config import get_preset
    from echocxr.model.tokenizer import train_bpe
    from echocxr.model.vlm import EchoVLM

    cfg = get_preset(preset)
    tok = train_bpe(["Findings: no effusion. Impression: normal."] * 4, 300)
    previous = torch.get_default_dtype()
    try:  # allocate the weights where they run, in their dtype (a 7B shape is 16 GB in bf16)
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = EchoVLM.from_config(cfg, tok, dtype=dtype, seed=0)
    finally:
        torch.set_default_dtype(previous)
    model.visual.requires_grad_(False)  # not run here: only the decoder stack differs
    return cfg, model


def run(args) -> int:
    preset = args.shape or args.preset or "small"
    try:
        vision = [int(v) for v in args.vision.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--vision: expected comma-separated integers, got {args.vision!r}") from None
    if not vision or min(vision) < 1 or args.response < 1 or args.block_size < 1:
        raise UserError("--vision, --response and --block-size must be positive")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    attention = args.attention or ("flex" if device.type == "cuda" else "dense")
    from echocxr.model.config import get_preset

    cfg = get_preset(preset)
    model = forward = None
    if not args.no_measure:
        cfg, model = _build(preset, device, dtype)
        model.train()
        forward = model.forward
        if attention == "flex":  # eager flex_attention materialises the scores; compiled it skips tiles
            forward = torch.compile(model.forward, dynamic=False)
    R = args.response
    lines = []
    for V in vision:
        rad, sym = layouts(V, R, args.block_size)
        dup = duplicated_layout(V, R, args.block_size)
        flops = {lay.name: analytic_flops(cfg, lay, R) for lay in (rad, sym, dup)}
        rec = {
            "bench": "rad",
            "preset": preset,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "attention": attention,
            "V": V,
            "R": R,
            "block": args.block_size,
            "batch": args.batch_size,
            "formula_linear_ratio": 2 * (V + R) / (V + 2 * R),
            "rad": flops["rad"],
            "symmetric": flops["symmetric"],
            "duplicated": flops["duplicated"],
        }
        for kind in ("exact", "tiles", "dense"):
            rec[f"flop_ratio_{kind}"] = flops["symmetric"][f"total_{kind}"] / flops["rad"][f"total_{kind}"]
        rec["flop_ratio_linear"] = flops["symmetric"]["linear"] / flops["rad"]["linear"]
        if model is not None:
            inputs = {
                lay.name: (
                    *_step_inputs(model, lay, V, R, args.batch_size, device, dtype, attention == "flex"),
                    lay.response_slots,
                )
                for lay in (rad, sym, dup)
            }
            names = ("rad", "symmetric", "duplicated")
            t = time_steps(model, forward, inputs, names, args.steps, args.warmup, device)
            rec["step_s"] = t
            rec["time_ratio"] = t["symmetric"] / t["rad"]
            rec["time_ratio_duplicated"] = t["duplicated"] / t["rad"]  # the trained ablation's cost
            # the target: measured speedup within 10% of the FLOP ratio of the attention actually run
            kind = "tiles" if attention == "flex" else "dense"
            rec["time_vs_flops"] = rec["time_ratio"] / rec[f"flop_ratio_{kind}"]
            rec["steps"] = args.steps
            rec["threads"] = torch.get_num_threads()
        line = json.dumps(rec)
        print(line, flush=True)
        lines.append(line)
    if args.append:
        from pathlib import Path

        path = Path(args.append)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write("\n".join(lines) + "\n")
    return 0
