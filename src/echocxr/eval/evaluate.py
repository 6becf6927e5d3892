"""`echocxr eval`: decode the held-out studies with one decoder and score the reports.

    records (eval_en/zh.jsonl or corpus.jsonl --split test) -> images (phantom or real)
    -> generate (ar | block | onestep) -> samples.jsonl -> metrics (+ bootstrap CIs)
    -> aggregate.json / aggregate.md

Outputs in --out:
- `settings.json`: what produced the samples (checkpoint, corpus, decoder settings). A rerun with
  the same settings resumes: studies already in `samples.jsonl` are not decoded again.
- `samples.jsonl`: one line per study: record id, language, hypothesis, reference, image source,
  phantom truth (the findings the phantom was rendered with), decode stats, per-sample metrics.
- `aggregate.json` / `aggregate.md`: every metric with its 95% bootstrap interval (per language),
  skipped metrics with the reason, the number of distinct reports, and the decode speed measured
  during this eval.

Image-blind controls (`--image-source blank|shuffled`, issue #13): the same checkpoint reads a
constant mid-grey image (`BLANK_LEVEL`, same size, views and preprocessing as a phantom), or the
phantoms of another study of the same eval set (a seeded derangement, `shuffled_donors`), while
the truth and the reference stay the study's own. A model that reads its image scores clearly
higher on its own phantoms than on either control.

Under `torchrun --nproc-per-node N -m echocxr eval ...` each rank decodes its share of the batches
(`decode.archive`: the same batches as one process) and rank 0 merges and scores once.

Speed is measured around `generate` only (prefill + decoding, not image rendering or metrics):
tokens/s counts generated tokens up to and including each row's first EOS; forwards per token is
a batch's forward passes over its longest row (the row that keeps the batch running), summed
over batches. With --batch-size 1 both are exact per study.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from echocxr.decode.archive import check_settings, weights_digest, write_atomic  # shared with generate
from echocxr.decode.config import DecodeConfig  # the decoding defaults
from echocxr.errors import UserError

SETTINGS = "settings.json"
SAMPLES = "samples.jsonl"
AGGREGATE_JSON = "aggregate.json"
AGGREGATE_MD = "aggregate.md"

# Cheap enough for every eval on CPU; the registry's other metrics need local model folders.
IMAGE_SOURCES: tuple[str, ...] = ("phantom", "real", "auto", "blank", "shuffled")
CONTROL_SOURCES: tuple[str, ...] = ("blank", "shuffled")  # image-blind controls; truth = own phantom
BLANK_LEVEL = 128  # the blank control's grey value (uint8): mid-grey, neither film black nor bone white

DEFAULT_METRICS: tuple[str, ...] = (
    "bleu_coco",
    "meteor_coco",
    "rougeL_coco",
    "cider_coco",
    "rougeL_rouge_score",
    "semscore_minilm",
    "label_f1",
    "phantom_f1",
    "phantom_grounding",
)


@dataclass(frozen=True)
class EvalConfig:
    ckpt: str
    corpus: str
    out: str
    decoder: str = "ar"
    block_size: int | None = None  # None: the checkpoint's block size (echocxr.json), else DecodeConfig's
    steps: int | None = None  # "block" decoder: None means one token per step (steps = block size)
    fused: bool = True
    strategy: str = DecodeConfig.strategy
    threshold: float = DecodeConfig.threshold
    max_new_tokens: int | None = None  # None: the checkpoint's max_response_tokens
    batch_size: int = 8
    limit: int | None = None
    split: str = "test"  # "all" keeps every record of the file
    language: str | None = None  # None: every language in the file
    image_source: str = "phantom"
    views: tuple[str, ...] | None = None  # None: the checkpoint's training views, else frontal
    metrics: tuple[str, ...] = DEFAULT_METRICS
    bootstrap: int = 1000
    seed: int = 0
    device: str = "cpu"
    record_trajectory: bool = False  # keep per-position commit confidences (for the EOS plot)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be >= 1, got {self.limit}")
        if self.image_source not in IMAGE_SOURCES:
            raise UserError(
                f"--image-source must be one of {', '.join(IMAGE_SOURCES)}, not {self.image_source!r}"
            )

    def fingerprint(self) -> dict:
        """The settings that decide the decoded text: a rerun resumes only when they match."""
        d = asdict(self)
        for k in ("out", "batch_size", "limit", "metrics", "bootstrap", "device", "record_trajectory"):
            d.pop(k)
        d["ckpt"] = str(Path(self.ckpt).resolve())
        d["corpus"] = str(Path(self.corpus).resolve())
        d["ckpt_weights"] = weights_digest(Path(self.ckpt))
        if self.image_source == "shuffled":
            d["limit"] = self.limit  # the derangement runs over the evaluated studies
        return d


# ----------------------------------------------------------------------------------------------
# Files


def read_samples(path: Path) -> list[dict]:
    """Samples already decoded. A torn last line (a killed run mid-write) is dropped with a note;
    a malformed line elsewhere is a user problem."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):
                print(
                    f"{path}:{i}: incomplete last line (interrupted run), decoding it again", file=sys.stderr
                )
                continue
            raise UserError(f"{path}:{i}: not a JSON sample line; delete the file to start over") from None
    return out


def _check_settings(out: Path, fingerprint: dict) -> None:
    """Write out/settings.json, or check that the one there matches (resume)."""
    check_settings(out / SETTINGS, fingerprint)


# ----------------------------------------------------------------------------------------------
# Records and images


def load_records(cfg: EvalConfig):
    from echocxr.data.records import load_corpus

    records = load_corpus(cfg.corpus)
    if not records:
        raise UserError(f"{cfg.corpus}: no records")
    picked = [
        r
        for r in records
        if (cfg.split == "all" or r.split == cfg.split)
        and (cfg.language is None or r.language == cfg.language)
    ]
    if not picked:
        splits = sorted({r.split for r in records})
        langs = sorted({r.language for r in records})
        raise UserError(
            f"{cfg.corpus}: no records with split {cfg.split!r}"
            + (f" and language {cfg.language!r}" if cfg.language else "")
            + f" (the file has splits {splits}, languages {langs}; --split all keeps every record)"
        )
    return picked[: cfg.limit] if cfg.limit else picked


def phantom_truth(record, seed: int) -> dict:
    """The findings the eval phantom of this study was rendered with (every attribute resolved)."""
    from echocxr.data.phantom import findings_for_record, resolve_findings, study_seed

    findings, _ = findings_for_record(record)
    drawn = resolve_findings(findings, seed=study_seed(record.study_id, seed, None))
    return {obs: {k: v for k, v in f.to_dict().items() if k != "observation"} for obs, f in drawn.items()}


def record_images(record, *, size: int, seed: int, source: str, views, root: Path):
    """(images, "real" | "phantom") for one study; "auto" takes real files where every view has one.

    A study whose files exist is never switched to phantoms behind the user's back: a real file
    that cannot be read or is refused (corrupt, truncated, an unreadable DICOM, too small, a strip)
    raises UserError naming the file, under "auto" as under "real" (docs/METRICS.md). Only a study
    without a file for some requested view gets phantoms under "auto".
    """
    from echocxr.data.images import real_image_paths, study_images
    from echocxr.data.phantom import MAX_SIZE, MIN_SIZE

    # The phantom renderer has a size range (tiny's 56 px is below it); the image processor
    # resizes to the model's input either way.
    size = min(max(size, MIN_SIZE), MAX_SIZE)
    if source == "auto":
        if real_image_paths(record, views, Path(root) if root is not None else None) is None:
            source = "phantom"
        else:
            try:
                imgs = study_images(record, size=size, seed=seed, source="real", views=views, root=root)
            except UserError as e:
                raise UserError(
                    f"{e} (study {record.study_id}; --image-source auto uses a study's files when they "
                    "exist: fix or remove the file, or pass --image-source phantom)"
                ) from None
            return imgs, "real"
    return study_images(record, size=size, seed=seed, source=source, views=views, root=root), source


def shuffled_donors(records, seed: int) -> dict:
    """record_id -> the record whose phantoms this study is shown in the shuffled control.

    A seeded derangement over studies: the studies in a random order, each taking the images of
    the next (one cycle, so no study keeps its own; the records of one study, e.g. its EN and ZH
    copies, share a donor). Deterministic for (the study ids, seed). Raises UserError with
    fewer than two studies.
    """
    import numpy as np

    studies = list(dict.fromkeys(r.study_id for r in records))
    if len(studies) < 2:
        raise UserError(f"--image-source shuffled needs at least 2 studies, got {len(studies)}")
    order = [studies[i] for i in np.random.default_rng(seed).permutation(len(studies))]
    donor_of = {order[j]: order[(j + 1) % len(order)] for j in range(len(order))}
    first: dict = {}
    for r in records:
        first.setdefault(r.study_id, r)
    return {r.record_id: first[donor_of[r.study_id]] for r in records}


def blank_images(n_views: int, size: int):
    """`n_views` constant `BLANK_LEVEL` grayscale images of size x size (the blank control)."""
    from PIL import Image

    return [Image.new("L", (size, size), BLANK_LEVEL) for _ in range(n_views)]


def eval_images(record, *, size: int, seed: int, source: str, views, root: Path, donor=None):
    """(images, source used, study the images come from) for one study under `source`.

    phantom / real / auto: `record_images`. blank: `blank_images` at the phantom's size.
    shuffled: the phantoms of `donor` (from `shuffled_donors`; required). The truth scored
    against is always the study's own (`phantom_truth(record)`), whatever the images show.
    """
    from echocxr.data.phantom import MAX_SIZE, MIN_SIZE

    if source == "blank":
        return blank_images(len(views), min(max(size, MIN_SIZE), MAX_SIZE)), source, None
    if source == "shuffled":
        if donor is None:
            raise ValueError("the shuffled control needs the donor study (shuffled_donors)")
        imgs, _ = record_images(donor, size=size, seed=seed, source="phantom", views=views, root=root)
        return imgs, source, donor.study_id
    imgs, used = record_images(record, size=size, seed=seed, source=source, views=views, root=root)
    return imgs, used, record.study_id


# ----------------------------------------------------------------------------------------------
# Decoding


@dataclass
class Loaded:
    model: object
    tokenizer: object
    processor: object
    meta: dict
    tokens_per_image: int
    image_size: int
    block_size: int
    max_new_tokens: int
    views: tuple[str, ...]
    engine: object = None  # echocxr.decode.engine.Engine, reused across batches


def load_checkpoint(cfg: EvalConfig) -> Loaded:
    from echocxr.decode.engine import Engine

    # One engine for every batch of this eval; its DecodeConfig comes from the checkpoint's
    # metadata (DecodeConfig.from_checkpoint) with this eval's settings on top.
    engine = Engine.from_checkpoint(
        cfg.ckpt,
        device=cfg.device,
        decoder=cfg.decoder,
        max_new_tokens=cfg.max_new_tokens,
        block_size=cfg.block_size,
        steps=cfg.steps,
        strategy=cfg.strategy,
        threshold=cfg.threshold,
        fused=cfg.fused,
        record_trajectory=cfg.record_trajectory,
        seed=cfg.seed,
    )
    mcfg, meta, dcfg = engine.model.config, engine.meta, engine.cfg
    views = cfg.views or tuple(meta.get("views") or ("frontal",))
    return Loaded(
        engine.model,
        engine.tokenizer,
        engine.processor,
        meta,
        mcfg.image_tokens,
        mcfg.image_size,
        dcfg.block_size,
        dcfg.max_new_tokens,
        views,
        engine,
    )


def decode_config(cfg: EvalConfig, loaded: Loaded):
    return loaded.engine.cfg


def _jsonable(value):
    """Decoder stats as JSON: tensors to lists, anything else unknown to its repr."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def commit_confidences(trajectory, row: int, eos: int) -> list[tuple[bool, float]] | None:
    """(is EOS, confidence when committed) per committed position of one row, from a block
    decoder's trajectory (`decode.block`: trajectory[row][block][step] of StepRecord), or None
    when the decoder recorded none."""
    if not trajectory or row >= len(trajectory):
        return None
    out = []
    for block in trajectory[row]:
        for step in block:
            for t, c in zip(step.tokens, step.confidence, strict=True):
                out.append((int(t) == eos, float(c)))
    return out


def decode_batch(records, loaded: Loaded, cfg: EvalConfig, dcfg, root: Path, donors=None) -> list[dict]:
    """Decode one batch of studies; one sample row per record. `donors`: `shuffled_donors`
    output (only for --image-source shuffled)."""
    import torch

    from echocxr.batch import Example, collate

    examples, sources, image_from = [], [], []
    for r in records:
        imgs, src, origin = eval_images(
            r,
            size=loaded.image_size,
            seed=cfg.seed,
            source=cfg.image_source,
            views=loaded.views,
            root=root,
            donor=(donors or {}).get(r.record_id),
        )
        examples.append(Example(imgs, r.language, None, r.record_id))
        sources.append(src)
        image_from.append(origin)
    batch = collate(examples, loaded.tokenizer, loaded.processor, loaded.tokens_per_image).to(cfg.device)
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = loaded.engine.generate(batch, dcfg)
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    eos = loaded.model.special.eos
    B = len(records)
    longest = max(len(t) for t in out.tokens)
    rows = []
    for b, (r, toks) in enumerate(zip(records, out.tokens)):
        hyp = loaded.engine.text(toks).strip()
        row = {
            "record_id": r.record_id,
            "study_id": r.study_id,
            "language": r.language,
            "hypothesis": hyp,
            "reference": r.report,
            "image_source": sources[b],
            "image_from": image_from[b],
            # Controls keep the study's own truth: a report matching it without the image is a guess.
            "truth": phantom_truth(r, cfg.seed) if sources[b] != "real" else None,
            "decode": {
                "tokens": len(toks),
                "ended": bool(toks) and toks[-1] == eos,
                "batch_size": B,
                "batch_forwards": int(out.forwards),
                "batch_longest": longest,
                "batch_seconds": seconds,
                "stats": _jsonable(out.stats),
            },
        }
        if cfg.record_trajectory:
            row["commits"] = commit_confidences(out.trajectory, b, eos)
        rows.append(row)
    return rows


def speed_summary(samples: list[dict]) -> dict:
    """Tokens/s and forwards per token over samples; each sample carries 1/B of its batch's cost."""
    if not samples:
        return {}
    tokens = sum(s["decode"]["tokens"] for s in samples)
    seconds = sum(s["decode"]["batch_seconds"] / s["decode"]["batch_size"] for s in samples)
    forwards = sum(s["decode"]["batch_forwards"] / s["decode"]["batch_size"] for s in samples)
    longest = sum(s["decode"]["batch_longest"] / s["decode"]["batch_size"] for s in samples)
    return {
        "samples": len(samples),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
        "forwards_per_token": forwards / longest if longest > 0 else float("nan"),
        "mean_tokens": tokens / len(samples),
        "ended_share": sum(bool(s["decode"]["ended"]) for s in samples) / len(samples),
    }


def report_summary(samples: list[dict]) -> dict[str, dict]:
    """Per language: studies, distinct generated reports (exact text after decoding), and the
    share of studies given the most common report. A model that ignores its image writes few."""
    from collections import Counter

    by_lang: dict[str, list[str]] = {}
    for s in samples:
        by_lang.setdefault(s["language"], []).append(s["hypothesis"])
    out = {}
    for lang, hyps in sorted(by_lang.items()):
        counts = Counter(hyps)
        out[lang] = {
            "samples": len(hyps),
            "distinct": len(counts),
            "top_share": counts.most_common(1)[0][1] / len(hyps),
        }
    return out


def eos_confidence(model, batch, block: int) -> dict[str, list[float]]:
    """Confidence of the model on reference reports with every response block fully masked, the
    situation of a one-step decoder (and of the first step of the block decoder).

    One forward in the RAD layout [prompt | noisy (all <|mask|>) | clean reference]: noisy block i
    sees the prompt, clean blocks < i and itself, and each token is read from the slot the decoders
    read it from (the token shift of `model.layout.AR_SHIFT`; `model.layout.rad_student_logits`).
    Confidence = the probability given to the reference token. Positions up to the end of the
    block holding each row's first EOS count; "eos" collects that first EOS and the EOS padding
    after it in its block (what the decoder must emit there), "content" every earlier token.
    `batch` must come from `collate(..., multiple_of=block)` with reports.
    """
    import torch

    from echocxr.model.layout import AR_SHIFT, rad_student_logits

    R = batch.response_ids.shape[1]
    if R % block:
        raise ValueError(f"response length {R} is not a multiple of the block size {block}")
    with torch.no_grad():
        logits = rad_student_logits(model, batch, batch.response_ids, block, AR_SHIFT)
        probs = logits.float().softmax(-1)
        p_ref = probs.gather(-1, batch.response_ids[..., None])[..., 0]  # [B, R]
    out: dict[str, list[float]] = {"eos": [], "content": []}
    for b, n in enumerate(batch.response_len.tolist()):
        end = -(-n // block) * block
        out["content"] += p_ref[b, : n - 1].tolist()
        out["eos"] += p_ref[b, n - 1 : end].tolist()
    return out


def summarize_confidence(values: dict[str, list[float]]) -> dict:
    """Means, standard errors and counts of `eos_confidence` output (the plot's input per block)."""
    import math

    out = {}
    for kind, v in values.items():
        n = len(v)
        mean = sum(v) / n if n else float("nan")
        var = sum((x - mean) ** 2 for x in v) / (n - 1) if n > 1 else 0.0
        out[kind], out[f"{kind}_se"], out[f"{kind}_n"] = mean, math.sqrt(var / n) if n else 0.0, n
    return out


# ----------------------------------------------------------------------------------------------
# Metrics


def score(samples: list[dict], names, *, bootstrap: int, seed: int) -> dict[str, dict]:
    """Per language: every metric's aggregates with CIs (or why it was skipped); per-sample values
    are written into each sample's "metrics"."""
    from echocxr.eval import metrics
    from echocxr.eval.bootstrap import bootstrap_ci

    by_lang: dict[str, list[dict]] = {}
    for s in samples:
        by_lang.setdefault(s["language"], []).append(s)
    table: dict[str, dict] = {}
    for lang, group in sorted(by_lang.items()):
        hyps = [s["hypothesis"] for s in group]
        refs = [s["reference"] for s in group]
        have_truth = all(s["truth"] is not None for s in group)
        ok = metrics.available(language=lang)
        out: dict[str, dict] = {}
        for s in group:
            s["metrics"] = {}
        for name in names:
            if not ok.get(name, "").startswith("ok"):
                out[name] = {"skipped": ok.get(name, "unknown metric")}
                continue
            kw = {}
            if metrics.REGISTRY[name].needs_truth:
                if not have_truth:
                    out[name] = {"skipped": "needs phantom images (some studies used real images)"}
                    continue
                kw["truth"] = [s["truth"] for s in group]
            result = metrics.compute(name, hyps, refs, language=lang, **kw)
            cis = bootstrap_ci(result, n_resamples=bootstrap, seed=seed)
            for key, value in result.aggregate.items():
                ci = cis.get(key)
                entry = {"value": float(value), "ci95": [ci.lo, ci.hi] if ci else None}
                notes = [n for n in (result.note, ci.method_note if ci else "") if n]
                if notes:
                    entry["note"] = "; ".join(notes)
                out[key] = entry
            for s, values in zip(group, result.per_sample):
                s["metrics"].update({k: float(v) for k, v in values.items()})
        table[lang] = out
    return table


def markdown_table(aggregate: dict) -> str:
    lines = [f"# Eval: {aggregate['decoder_label']}", ""]
    sp = aggregate["speed"]
    lines += [
        f"- checkpoint: `{aggregate['settings']['ckpt']}`",
        f"- corpus: `{aggregate['settings']['corpus']}` ({sp.get('samples', 0)} studies)",
        f"- speed: {sp.get('tokens_per_s', float('nan')):.1f} tokens/s, "
        f"{sp.get('forwards_per_token', float('nan')):.3f} forwards/token, "
        f"{sp.get('mean_tokens', float('nan')):.1f} tokens per report",
        f"- machine: {aggregate['machine']}, {aggregate['date']}",
        "",
    ]
    reports = aggregate.get("reports", {})
    for lang, table in aggregate["metrics"].items():
        lines += [f"## {lang}", ""]
        if lang in reports:
            r = reports[lang]
            lines += [
                f"- distinct reports: {r['distinct']} of {r['samples']} "
                f"(the most common one for {100 * r['top_share']:.0f}% of studies)",
                "",
            ]
        lines += ["| metric | value | 95% CI |", "| --- | --- | --- |"]
        for key, e in table.items():
            if "skipped" in e:
                continue
            ci = e.get("ci95")
            ci_text = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "n/a"
            lines.append(f"| {key} | {e['value']:.4f} | {ci_text} |")
        skipped = [(k, e["skipped"]) for k, e in table.items() if "skipped" in e]
        if skipped:
            lines += ["", "Skipped:", *[f"- `{k}`: {why}" for k, why in skipped]]
        lines.append("")
    return "\n".join(lines)


def machine_name(device: str = "cpu") -> str:
    """The GPU's name on CUDA, else the CPU model and core count (for labelling numbers)."""
    import platform

    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def decoder_label(dcfg) -> str:
    if dcfg.decoder == "ar":
        return "ar"
    if dcfg.decoder == "block":
        return f"block B={dcfg.block_size} K={dcfg.steps}"
    return f"onestep B={dcfg.block_size} {'fused' if dcfg.fused else 'vanilla'}"


# ----------------------------------------------------------------------------------------------
# The command


def evaluate(cfg: EvalConfig, *, progress: bool = True) -> dict | None:
    """Decode what is not yet in samples.jsonl, score everything, write the aggregate. Returns it.

    Under torchrun each rank decodes its share (`decode.archive.deal`: the same batches as one
    process) into parts/; rank 0 merges them, scores once and returns the aggregate, the other
    ranks return None."""
    from dataclasses import replace

    from tqdm import tqdm

    from echocxr.decode import archive

    d = archive.join()
    out = Path(cfg.out)
    archive.on_main(
        d, lambda: (out.mkdir(parents=True, exist_ok=True), _check_settings(out, cfg.fingerprint()))
    )
    records = load_records(cfg)
    samples_path = out / SAMPLES
    log = archive.ShardedRows(samples_path, "record_id", d)
    done_ids = archive.on_main(d, lambda: set(log.collect()))
    todo = [r for r in records if r.record_id not in done_ids]
    rank_cfg = replace(cfg, device=archive.rank_device(cfg.device, d))  # cuda -> cuda:LOCAL_RANK
    loaded = load_checkpoint(rank_cfg)
    dcfg = decode_config(cfg, loaded)
    root = Path(cfg.corpus).resolve().parent
    donors = shuffled_donors(records, cfg.seed) if cfg.image_source == "shuffled" else None
    length = archive.prompt_lengths(loaded.tokenizer, loaded.tokens_per_image)
    costs = [length(len(loaded.views), r.language) for r in todo]
    mine = archive.deal(costs, cfg.batch_size, d.rank, d.world)
    if mine:
        # Append mode: each finished batch is on disk before the next starts (resumable).
        with (
            log.open() as f,
            tqdm(
                total=len(records) if d.world == 1 else sum(map(len, mine)),
                initial=len(records) - len(todo) if d.world == 1 else 0,
                desc=decoder_label(dcfg) + (f" rank {d.rank}/{d.world}" if d.world > 1 else ""),
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            for idx in mine:
                chunk = [todo[i] for i in idx]
                f.write(decode_batch(chunk, loaded, rank_cfg, dcfg, root, donors))
                bar.update(len(chunk))
    archive.barrier(d)
    if not d.main:
        archive.leave(d)
        return None
    done = log.collect()
    samples = [done[r.record_id] for r in records]
    table = score(samples, cfg.metrics, bootstrap=cfg.bootstrap, seed=cfg.seed)
    write_atomic(samples_path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    aggregate = {
        "decoder_label": decoder_label(dcfg),
        "decode": asdict(dcfg),
        "settings": cfg.fingerprint(),
        "checkpoint_meta": {k: v for k, v in loaded.meta.items() if k != "model"},
        "speed": speed_summary(samples),
        "reports": report_summary(samples),
        "image_source": cfg.image_source,
        "metrics": table,
        "machine": machine_name(cfg.device),
        "date": time.strftime("%Y-%m-%d"),
        "command": "echocxr eval " + " ".join(cli_args(cfg)),
    }
    write_atomic(out / AGGREGATE_JSON, json.dumps(aggregate, indent=2, ensure_ascii=False) + "\n")
    write_atomic(out / AGGREGATE_MD, markdown_table(aggregate))
    log.remove_parts()
    archive.leave(d)
    return aggregate


def cli_args(cfg: EvalConfig) -> list[str]:
    """The command-line flags that reproduce `cfg` (for labelling numbers with their command)."""
    a = ["--ckpt", cfg.ckpt, "--corpus", cfg.corpus, "--out", cfg.out, "--decoder", cfg.decoder]
    if cfg.block_size:
        a += ["--block-size", str(cfg.block_size)]
    if cfg.steps:
        a += ["--steps", str(cfg.steps)]
    if not cfg.fused:
        a.append("--no-fuse")
    if cfg.strategy != EvalConfig.strategy:
        a += ["--strategy", cfg.strategy]
    if cfg.max_new_tokens:
        a += ["--max-new-tokens", str(cfg.max_new_tokens)]
    a += ["--batch-size", str(cfg.batch_size)]
    if cfg.limit:
        a += ["--limit", str(cfg.limit)]
    if cfg.split != "test":
        a += ["--split", cfg.split]
    if cfg.language:
        a += ["--language", cfg.language]
    a += ["--image-source", cfg.image_source]
    if cfg.views:
        a += ["--views", ",".join(cfg.views)]
    if tuple(cfg.metrics) != DEFAULT_METRICS:
        a += ["--metrics", ",".join(cfg.metrics)]
    if cfg.device != "cpu":
        a += ["--device", cfg.device]
    if cfg.record_trajectory:
        a.append("--record-trajectory")
    return a


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (from `echocxr train`)")
    parser.add_argument("--corpus", required=True, help="eval_en.jsonl, eval_zh.jsonl or corpus.jsonl")
    parser.add_argument("--out", required=True, help="output folder (rerun with it to resume)")
    parser.add_argument("--decoder", default="ar", choices=("ar", "block", "onestep"))
    parser.add_argument("--block-size", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--steps", type=int, default=None, help="block decoder: steps per block (default B)")
    parser.add_argument("--no-fuse", dest="fused", action="store_false", help="onestep: vanilla block cache")
    parser.add_argument("--strategy", default=EvalConfig.strategy)
    parser.add_argument("--threshold", type=float, default=EvalConfig.threshold)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    parser.add_argument("--limit", type=int, default=None, help="first N studies only")
    parser.add_argument("--split", default="test", help="records of this split (all: every record)")
    parser.add_argument("--language", default=None, choices=("en", "zh"))
    parser.add_argument(
        "--image-source",
        default="phantom",
        choices=IMAGE_SOURCES,
        help="blank / shuffled: image-blind controls (constant grey image / another study's phantoms; "
        "the truth stays the study's own)",
    )
    parser.add_argument(
        "--views", default=None, help="comma list, e.g. frontal,lateral (default: the checkpoint's)"
    )
    parser.add_argument(
        "--metrics", default=",".join(DEFAULT_METRICS), help="comma list of registry names, or 'all'"
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--record-trajectory", action="store_true", help="keep commit confidences per token")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    from echocxr.eval import metrics

    names = (
        tuple(metrics.REGISTRY) if args.metrics == "all" else tuple(m for m in args.metrics.split(",") if m)
    )
    unknown = [n for n in names if n not in metrics.REGISTRY]
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(metrics.REGISTRY)}")
    return EvalConfig(
        ckpt=args.ckpt,
        corpus=args.corpus,
        out=args.out,
        decoder=args.decoder,
        block_size=args.block_size,
        steps=args.steps,
        fused=args.fused,
        strategy=args.strategy,
        threshold=args.threshold,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        limit=args.limit,
        split=args.split,
        language=args.language,
        image_source=args.image_source,
        views=tuple(args.views.split(",")) if args.views else None,
        metrics=names,
        bootstrap=args.bootstrap,
        seed=args.seed,
        device=args.device,
        record_trajectory=args.record_trajectory,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    agg = evaluate(cfg, progress=not args.quiet)
    if agg is None:  # a torchrun rank other than 0: rank 0 writes and prints
        return 0
    print(markdown_table(agg))
    print(f"wrote {Path(cfg.out) / AGGREGATE_MD}, {Path(cfg.out) / SAMPLES}")
    return 0
