"""`echocxr bench phantoms`: can a small CNN read the findings off the phantoms, and how fast are they drawn?

Learnability: IU studies are split by a hash of the study id (`--test-frac` to test), a compact CNN
(no torchvision) is trained multi-label on phantoms of the training studies, each epoch drawing
fresh nuisance variation (`study_images(..., epoch=e)`, as training does), and per-finding AUROC
is measured on the deterministic evaluation renders of the test studies. `--shuffle-labels`
permutes the training studies' label rows (images unchanged): a control that must stay near 0.5.

Speed: renders per second of process CPU time (one thread, so "per core") over the IU studies'
own findings at one size.

Also reported: how often IU content cannot be drawn (MeSH terms `mesh_to_findings` leaves unmapped,
report text that compares with a prior study). Prints one JSON line, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from echocxr.data.observations import OBSERVATIONS
from echocxr.errors import UserError

CLASSES: tuple[str, ...] = tuple(o for o in OBSERVATIONS if o != "no_finding")


@dataclass(frozen=True)
class BenchConfig:
    train: int = 2000  # training studies (at most; the split decides which)
    test: int = 600
    test_frac: float = 0.25
    epochs: int = 8
    size: int = 128
    batch_size: int = 32
    lr: float = 3e-3
    width: int = 16  # channels of the first stage; doubled at each downsampling
    seed: int = 0
    shuffle_labels: bool = False
    min_train: int = 40  # the AUROC target applies to findings with this many training positives
    device: str = "cpu"

    def __post_init__(self) -> None:
        from echocxr.data.phantom import MAX_SIZE, MIN_SIZE

        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise UserError(f"--size must be in [{MIN_SIZE}, {MAX_SIZE}], got {self.size}")
        if self.train < 1 or self.test < 1 or self.epochs < 1 or self.batch_size < 1:
            raise UserError("--train, --test, --epochs and --batch-size must be positive")
        if not 0 < self.test_frac < 1:
            raise UserError(f"--test-frac must be in (0, 1), got {self.test_frac}")


# --------------------------------------------------------------------------------------------
# Data: studies, labels, split
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    record: object  # echocxr.data.records.Record
    labels: np.ndarray  # [len(CLASSES)] float32, 1 = drawn positive


def label_vector(findings) -> np.ndarray:
    y = np.zeros(len(CLASSES), np.float32)
    for obs in findings:
        if obs in CLASSES:
            y[CLASSES.index(obs)] = 1.0
    return y


def split_studies(records, cfg: BenchConfig) -> tuple[list[Study], list[Study]]:
    """(train, test) by a hash of the study id, each truncated to the configured count."""
    from echocxr.data.phantom import findings_for_record
    from echocxr.data.splits import unit_hash

    train, test = [], []
    for r in records:
        findings, _ = findings_for_record(r)
        s = Study(r, label_vector(findings))
        side = test if unit_hash("phantom-bench", r.study_id) < cfg.test_frac else train
        side.append(s)
    return train[: cfg.train], test[: cfg.test]


def renderability(records) -> dict:
    """How often IU content cannot be drawn, over all given studies."""
    from echocxr.data.phantom import findings_for_record

    n = unmapped_any = comparison = nothing_drawn = 0
    terms: Counter = Counter()
    for r in records:
        findings, not_renderable = findings_for_record(r)
        n += 1
        unmapped = [x.removeprefix("mesh: ") for x in not_renderable if x.startswith("mesh: ")]
        unmapped_any += bool(unmapped)
        comparison += any(x.startswith("comparison") for x in not_renderable)
        nothing_drawn += bool(unmapped) and not (set(findings) - {"no_finding"})
        terms.update(t.split("/")[0] for t in unmapped)
    return {
        "studies": n,
        "with_unmapped_mesh": unmapped_any,
        "with_comparison_text": comparison,
        "unmapped_only": nothing_drawn,  # abnormal per MeSH, yet nothing drawable
        "top_unmapped_terms": terms.most_common(15),
    }


# --------------------------------------------------------------------------------------------
# Model: a compact CNN
# --------------------------------------------------------------------------------------------


def build_cnn(n_out: int, width: int):
    """Conv-BN-ReLU stages with stride-2 downsampling; global average and max pooling (max keeps
    small bright findings such as a granuloma from being averaged away)."""
    import torch
    from torch import nn

    def stage(cin, cout, stride):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    w = width
    chans = [w, 2 * w, 4 * w, 6 * w, 8 * w]

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(1, w, 5, 2, 2, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
            )
            self.stages = nn.Sequential(*[stage(a, b, 2) for a, b in zip(chans[:-1], chans[1:])])
            self.head = nn.Linear(2 * chans[-1], n_out)

        def forward(self, x):  # x: [B, 1, S, S]
            h = self.stages(self.stem(x))  # [B, C, S/32, S/32]
            pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
            return self.head(pooled)

    return CNN()


def _batch_images(studies, cfg: BenchConfig, epoch: int | None):
    import torch

    from echocxr.data.images import study_images

    imgs = [
        np.asarray(study_images(s.record, size=cfg.size, seed=cfg.seed, epoch=epoch, source="phantom")[0])
        for s in studies
    ]
    x = torch.from_numpy(np.stack(imgs)).float().unsqueeze(1)  # [B, 1, S, S]
    return (x - 110.0) / 60.0  # rough grey-level centring of phantoms


# --------------------------------------------------------------------------------------------
# Learnability
# --------------------------------------------------------------------------------------------


def learnability(train: list[Study], test: list[Study], cfg: BenchConfig, log=print) -> dict:
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    device = torch.device(cfg.device)
    g = torch.Generator().manual_seed(cfg.seed)
    y_train = np.stack([s.labels for s in train])  # [N, K]
    if cfg.shuffle_labels:
        y_train = y_train[np.random.default_rng(cfg.seed).permutation(len(train))]
    pos = y_train.sum(0)
    # Rare findings weigh more, capped so that a handful of positives cannot dominate.
    pos_weight = torch.tensor(np.clip((len(train) - pos) / np.maximum(pos, 1), 1, 20), dtype=torch.float32)
    model = build_cnn(len(CLASSES), cfg.width).to(device)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    t_render = t_train = 0.0
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train), generator=g).tolist()
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            t0 = time.perf_counter()
            x = _batch_images([train[j] for j in idx], cfg, epoch).to(device)
            y = torch.from_numpy(y_train[idx]).to(device)
            t1 = time.perf_counter()
            loss = F.binary_cross_entropy_with_logits(model(x), y, pos_weight=pos_weight.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            t_render += t1 - t0
            t_train += time.perf_counter() - t1
        log(f"epoch {epoch + 1}/{cfg.epochs} loss {total / len(train):.4f}")

    model.eval()
    scores = []
    with torch.no_grad():
        for i in range(0, len(test), 64):
            x = _batch_images(test[i : i + 64], cfg, None).to(device)
            scores.append(torch.sigmoid(model(x)).cpu().numpy())
    p = np.concatenate(scores)  # [M, K]
    y_test = np.stack([s.labels for s in test])
    per = {}
    for k, obs in enumerate(CLASSES):
        n_tr, n_te = int(pos[k]), int(y_test[:, k].sum())
        if n_tr == 0 and n_te == 0:
            continue
        both = 0 < n_te < len(test)
        per[obs] = {
            "train_pos": n_tr,
            "test_pos": n_te,
            "auroc": round(float(roc_auc_score(y_test[:, k], p[:, k])), 4) if both else None,
        }
    targeted = [
        v["auroc"] for v in per.values() if v["train_pos"] >= cfg.min_train and v["auroc"] is not None
    ]
    return {
        "per_finding": per,
        "macro_auroc_targeted": round(float(np.mean(targeted)), 4) if targeted else None,
        "min_auroc_targeted": round(float(np.min(targeted)), 4) if targeted else None,
        "render_s": round(t_render, 1),
        "train_s": round(t_train, 1),
    }


# --------------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------------


def render_speed(records, size: int, n: int, seed: int = 0, repeats: int = 3) -> dict:
    """Renders per second of this process's CPU time (one thread), cycling over the studies' findings.

    Each figure is the median of `repeats` timings of `n` renders (all of them are listed too:
    a shared machine's noise shows there). `per_cpu_second` is with the heap kept between renders
    (`keep_freed_memory`, as the phantom image path runs). When this process has not applied that
    yet, the default allocator is timed first, for comparison.
    """
    from echocxr.data.phantom import findings_for_record, keep_freed_memory, render_phantom, study_seed

    findings = [findings_for_record(r)[0] for r in records[: max(n, 1)]]
    ids = [r.study_id for r in records[: max(n, 1)]]
    render_phantom(findings[0], size=size, seed=0)  # build the cached textures outside the timing

    def rates() -> list[tuple[float, float]]:
        out = []
        for _ in range(max(repeats, 1)):
            c0, w0 = time.process_time(), time.perf_counter()
            for i in range(n):
                render_phantom(
                    findings[i % len(findings)], size=size, seed=study_seed(ids[i % len(ids)], seed)
                )
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            out.append((round(n / max(cpu, 1e-9), 1), round(n / max(wall, 1e-9), 1)))
        return out

    default = rates() if keep_freed_memory.cache_info().currsize == 0 else None
    kept = keep_freed_memory()
    runs = rates()
    return {
        "size": size,
        "renders": n,
        "repeats": len(runs),
        "per_cpu_second": statistics.median(r[0] for r in runs),
        "per_wall_second": statistics.median(r[1] for r in runs),
        "per_cpu_second_runs": [r[0] for r in runs],
        "heap_kept": kept,
        "per_cpu_second_default_allocator": None
        if default is None
        else statistics.median(r[0] for r in default),
        "per_cpu_second_default_allocator_runs": None if default is None else [r[0] for r in default],
    }


# --------------------------------------------------------------------------------------------
# Gallery
# --------------------------------------------------------------------------------------------

# One example per drawable finding, with attributes chosen to show it clearly.
GALLERY: tuple[tuple[str, dict], ...] = (
    ("normal", {}),
    ("cardiomegaly (severe)", {"cardiomegaly": {"severity": "severe"}}),
    ("wide mediastinum", {"enlarged_cardiomediastinum": {"severity": "severe"}}),
    ("effusion (right, moderate)", {"pleural_effusion": {"laterality": "right", "severity": "moderate"}}),
    ("effusion (bilateral, mild)", {"pleural_effusion": {"laterality": "bilateral", "severity": "mild"}}),
    ("pneumothorax (left)", {"pneumothorax": {"laterality": "left", "severity": "moderate"}}),
    ("consolidation (R lower)", {"consolidation": {"laterality": "right", "zone": "lower"}}),
    ("pneumonia (L middle)", {"pneumonia": {"laterality": "left", "zone": "middle"}}),
    (
        "lung opacity (R upper)",
        {"lung_opacity": {"laterality": "right", "zone": "upper", "severity": "severe"}},
    ),
    ("atelectasis (linear, L)", {"atelectasis": {"laterality": "left", "subtype": "linear"}}),
    ("atelectasis (lobar, L)", {"atelectasis": {"laterality": "left", "subtype": "lobar"}}),
    ("edema", {"edema": {"severity": "severe", "subtype": "edema"}}),
    ("vascular congestion", {"edema": {"subtype": "vascular_congestion"}}),
    ("nodule (R upper)", {"lung_lesion": {"laterality": "right", "zone": "upper", "subtype": "nodule"}}),
    ("mass (L middle)", {"lung_lesion": {"laterality": "left", "zone": "middle", "subtype": "mass"}}),
    ("calcified granuloma", {"calcified_granuloma": {"laterality": "right", "zone": "middle"}}),
    ("hyperinflation", {"hyperinflation": {"severity": "severe"}}),
    ("rib fractures (R)", {"fracture": {"laterality": "right", "subtype": "rib"}}),
    ("pacemaker", {"support_devices": {"subtype": "pacemaker"}}),
    ("central line", {"support_devices": {"subtype": "central_line"}}),
    ("ET + NG tube", {"support_devices": {"subtype": "endotracheal_tube"}}),
    ("sternotomy", {"sternotomy": {}}),
    ("scoliosis", {"scoliosis": {"severity": "severe"}}),
    ("degenerative spine", {"degenerative_spine": {}}),
    ("hiatal hernia", {"hiatal_hernia": {}}),
    ("aorta tortuous", {"aortic_abnormality": {"subtype": "tortuous"}}),
    ("aorta calcified", {"aortic_abnormality": {"subtype": "calcified"}}),
    ("pleural thickening", {"pleural_other": {"laterality": "bilateral", "zone": "upper"}}),
)


def write_gallery(path: Path, real_dir: Path | None, *, size: int = 256, seed: int = 0) -> None:
    """A labelled grid: one phantom per finding (same patient seed as the normal one), a lateral
    view, and the real radiographs of `real_dir` for comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from echocxr.data.images import load_image, prepare_image
    from echocxr.data.phantom import render_phantom

    tiles: list[tuple[str, np.ndarray]] = []
    for title, spec in GALLERY:
        findings = {obs: {"status": "positive", **attrs} for obs, attrs in spec.items()}
        tiles.append((title, render_phantom(findings, size=size, seed=seed)))
    tiles.append(("normal, lateral", render_phantom({}, view="lateral", size=size, seed=seed)))
    tiles.append(
        ("effusion, lateral", render_phantom(dict(GALLERY[3][1]), view="lateral", size=size, seed=seed))
    )
    if real_dir is not None and real_dir.is_dir():
        for p in sorted(real_dir.glob("*.png")):
            tiles.append((f"REAL {p.stem[:18]}", np.asarray(prepare_image(load_image(p), size))))
    cols = 8
    rows = math.ceil(len(tiles) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.75 + 0.3), dpi=100)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, img) in zip(axes.ravel(), tiles):
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="lanczos")
        ax.set_title(title, fontsize=6.5, color="darkred" if title.startswith("REAL") else "black")
    fig.suptitle("echocxr phantoms (synthetic; no clinical meaning) vs real IU radiographs (red)", fontsize=9)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    parser.add_argument("--iu", required=True, help="IU report archive (NLMCXR_reports.tgz)")
    parser.add_argument("--train", type=int, default=d.train, help="training studies (at most)")
    parser.add_argument("--test", type=int, default=d.test, help="held-out studies (at most)")
    parser.add_argument("--test-frac", type=float, default=d.test_frac)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--size", type=int, default=d.size, help="phantom size in pixels")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--width", type=int, default=d.width, help="CNN channels of the first stage")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", default=d.device, help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--shuffle-labels", action="store_true", help="control: permute training labels")
    parser.add_argument("--speed-only", action="store_true", help="only measure render speed")
    parser.add_argument("--speed-n", type=int, default=300, help="renders timed for the speed figure")
    parser.add_argument("--speed-size", type=int, default=224)
    parser.add_argument(
        "--speed-repeats", type=int, default=3, help="timings of --speed-n renders (median reported)"
    )
    parser.add_argument("--gallery", default=None, help="also write a labelled gallery PNG here")
    parser.add_argument("--real-images", default=None, help="folder of real PNGs for the gallery")
    parser.add_argument("--out", default=None, help="append the JSON line to this file")


def markdown_table(result: dict, min_train: int) -> str:
    lines = ["| finding | train + | test + | AUROC |", "|---|---:|---:|---:|"]
    per = result["learnability"]["per_finding"]
    for obs, v in sorted(per.items(), key=lambda kv: -kv[1]["train_pos"]):
        auc = "n/a" if v["auroc"] is None else f"{v['auroc']:.3f}"
        mark = "" if v["train_pos"] >= min_train else " (below target size)"
        lines.append(f"| {obs}{mark} | {v['train_pos']} | {v['test_pos']} | {auc} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from echocxr.data.phantom import iu_records

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available here")
    cfg = BenchConfig(
        train=args.train,
        test=args.test,
        test_frac=args.test_frac,
        epochs=args.epochs,
        size=args.size,
        batch_size=args.batch_size,
        lr=args.lr,
        width=args.width,
        seed=args.seed,
        shuffle_labels=args.shuffle_labels,
        device=args.device,
    )
    torch.manual_seed(cfg.seed)
    records = list(iu_records(args.iu))
    if not records:
        raise UserError(f"{args.iu}: no studies read")
    result: dict = {"bench": "phantoms", "config": asdict(cfg), "renderability": renderability(records)}
    if args.gallery:
        write_gallery(Path(args.gallery), Path(args.real_images) if args.real_images else None)
        result["gallery"] = args.gallery
    t0 = time.perf_counter()
    result["speed"] = render_speed(records, args.speed_size, args.speed_n, cfg.seed, args.speed_repeats)
    if not args.speed_only:
        train, test = split_studies(records, cfg)
        result["learnability"] = learnability(train, test, cfg, log=lambda m: print(m, flush=True))
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    if "learnability" in result:
        print(markdown_table(result, cfg.min_train))
    return 0
