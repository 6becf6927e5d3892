"""`echocxr data build`: read report corpora, clean, label, normalize, split, deduplicate, add
Chinese copies and write the bilingual corpus with its data card.

    read (readers/) -> filter -> label (labeler) -> normalize (normalize or LLM) -> split (splits)
    -> dedup (dedup) -> Chinese copies (zh or LLM) -> eval sets -> corpus.jsonl, eval_*.jsonl, data card

Outputs in --out: `corpus.jsonl` (every kept record, both languages, with its split),
`eval_en.jsonl` / `eval_zh.jsonl` (test records balanced across sources), `data_card.json` and
`data_card.md`. A rerun with the same inputs, config and code finds the fingerprint in the data
card and does nothing; embeddings and LLM replies are cached in `--cache-dir` either way.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from echocxr.data.readers import IssueLog, study_sort_key
from echocxr.data.records import LANGUAGES, SOURCES, SPLITS, Record, write_jsonl
from echocxr.errors import UserError

CARD_VERSION = 2  # 2: the consistency check (`consistency`)
OUTPUTS = ("corpus.jsonl", "eval_en.jsonl", "eval_zh.jsonl", "data_card.json", "data_card.md")


@dataclass(frozen=True)
class BuildConfig:
    out: str
    iu: str | None = None
    iu_images: str | None = None
    mimic: str | None = None
    chexpert: str | None = None
    rexgradient: str | None = None
    zh_share: float = 0.5  # share of training studies that also get a Chinese copy
    dedup: bool = True
    dedup_threshold: float = 0.97
    normalize: bool = True  # False: the original text is the target (ablation)
    eval_size: int = 2000  # per language, like the paper's 2,000 EN + 2,000 ZH
    llm: bool = False  # rewrite and translate with the LLM endpoint instead of the rules
    llm_url: str | None = None
    llm_model: str | None = None
    seed: int = 0
    val_frac: float = 0.05
    test_frac: float = 0.10
    check_images: bool = True  # open each image's header (False: existence only)
    cache_dir: str | None = None  # default: <out>/.cache
    force: bool = False  # rebuild even when the outputs are up to date

    def __post_init__(self) -> None:
        if not any((self.iu, self.mimic, self.chexpert, self.rexgradient)):
            raise UserError(
                "data build needs at least one corpus: --iu, --mimic, --chexpert or --rexgradient"
            )
        if self.iu_images and not self.iu:
            raise UserError("--iu-images needs --iu")
        if not 0.0 <= self.zh_share <= 1.0:
            raise UserError(f"--zh-share must be in [0, 1], got {self.zh_share}")
        if not 0.0 < self.dedup_threshold <= 1.0:
            raise UserError(f"--dedup-threshold must be in (0, 1], got {self.dedup_threshold}")
        if self.eval_size < 0:
            raise UserError(f"--eval-size must be >= 0, got {self.eval_size}")
        if not (0 <= self.val_frac and 0 <= self.test_frac and self.val_frac + self.test_frac < 1):
            raise UserError(f"bad split fractions --val-frac {self.val_frac} --test-frac {self.test_frac}")

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.out) / ".cache"


# ----------------------------------------------------------------------------------------------
# Filtering


# Sections that say nothing: "Please", "See impression.", "None.", or only de-identification marks.
_PLACEHOLDER = re.compile(
    r"^(please( see.*)?|see (the )?(impression|findings|above|below|report|comments?)|none|n/?a|"
    r"not applicable|pending|dictated|no report|report to follow|addendum)$",
    re.IGNORECASE,
)
_DEID = re.compile(r"x{3,}|_{2,}", re.IGNORECASE)
# Exams naming a body part other than the chest. IU bundles some chest studies with knee, hip or
# abdomen films in one report; those reports describe images a chest model never sees.
_NON_CHEST = re.compile(
    r"\b(knees?|hips?|pelvis|abdomen|abdominal|kub|ankles?|foot|feet|hands?|wrists?|elbows?|forearms?|"
    r"femurs?|tibias?|fibulas?|skull|sinus(es)?|lumbar|l-spine|cervical spine|c-spine|fingers?|toes?|"
    r"heels?|legs?)\b",
    re.IGNORECASE,
)


def is_placeholder(text: str) -> bool:
    t = _DEID.sub(" ", text)
    t = re.sub(r"[^\w/ ]+", " ", t)
    t = " ".join(t.split())
    return not re.search(r"[^\W\d_]", t) or bool(_PLACEHOLDER.match(t))


def drop_reason(rec: Record) -> str | None:
    """Why a study is left out, or None to keep it.

    The rule (the paper keeps studies with both sections): the exam is a chest exam only, and
    both FINDINGS and IMPRESSION hold real text (a placeholder such as "Please" or "See
    impression" counts as missing).
    """
    if _NON_CHEST.search(rec.meta.get("exam") or ""):
        return "non_chest_exam"
    has_f = bool(rec.findings) and not is_placeholder(rec.findings)
    has_i = bool(rec.impression) and not is_placeholder(rec.impression)
    if not has_f and not has_i:
        return "placeholder_report" if (rec.findings or rec.impression) else "empty_report"
    if not has_f:
        return "placeholder_findings" if rec.findings else "no_findings"
    if not has_i:
        return "placeholder_impression" if rec.impression else "no_impression"
    return None


# ----------------------------------------------------------------------------------------------
# Fingerprint: inputs + config + code, so an unchanged rerun is a no-op


def _path_stats(path: str) -> list:
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [[str(p.resolve()), st.st_size, st.st_mtime_ns]]
    out = []
    for root, dirs, files in os.walk(p):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            out.append([os.path.join(root, name), st.st_size, st.st_mtime_ns])
    return out


# The modules whose behaviour decides the outputs (not the whole package: an edit to, say, the
# phantom renderer must not invalidate a corpus).
_BUILD_MODULES = (
    "echocxr.data.build",
    "echocxr.data.readers",
    "echocxr.data.readers.iu",
    "echocxr.data.readers.mimic",
    "echocxr.data.readers.chexpert",
    "echocxr.data.readers.rexgradient",
    "echocxr.data.records",
    "echocxr.data.observations",
    "echocxr.data.mesh",
    "echocxr.data.labeler",
    "echocxr.data.normalize",
    "echocxr.data.zh",
    "echocxr.data.splits",
    "echocxr.data.dedup",
    "echocxr.data.llm",
)


def _code_hash() -> str:
    """Hash of the build's modules and prompts: a code change rebuilds."""
    import importlib.util

    files: list[Path] = sorted((Path(__file__).resolve().parent / "prompts").glob("*.txt"))
    for name in _BUILD_MODULES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # ValueError: a module object without a spec
            continue
        if spec is None or spec.origin is None:
            continue
        origin = Path(spec.origin)
        # A package (labeler/ as a folder, say) counts with all its sources.
        files += sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def fingerprint(cfg: BuildConfig) -> str:
    conf = {k: v for k, v in asdict(cfg).items() if k not in ("out", "cache_dir", "force")}
    if cfg.llm:  # the endpoint decides the text, so it is part of the inputs
        from echocxr.data.llm import LLMConfig

        llm = LLMConfig.from_env(cfg.llm_url, cfg.llm_model)
        conf["llm_endpoint"] = [llm.endpoint, llm.model]
    inputs = {
        k: _path_stats(getattr(cfg, k))
        for k in ("iu", "iu_images", "mimic", "chexpert", "rexgradient")
        if getattr(cfg, k)
    }
    blob = json.dumps(
        {"v": CARD_VERSION, "config": conf, "inputs": inputs, "code": _code_hash()}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def up_to_date(cfg: BuildConfig, fp: str) -> bool:
    out = Path(cfg.out)
    if not all((out / f).is_file() for f in OUTPUTS):
        return False
    try:
        return json.loads((out / "data_card.json").read_text(encoding="utf-8")).get("fingerprint") == fp
    except (OSError, json.JSONDecodeError):
        return False


# ----------------------------------------------------------------------------------------------
# The build


def _progress(iterable, desc: str, total: int | None = None):
    from tqdm import tqdm

    # disable=None: bars on a terminal, silent in logs and tests.
    return tqdm(iterable, desc=desc, total=total, disable=None, leave=False)


def read_sources(cfg: BuildConfig, log: IssueLog) -> list[Record]:
    from echocxr.data.readers.chexpert import read_chexpert
    from echocxr.data.readers.iu import read_iu
    from echocxr.data.readers.mimic import read_mimic
    from echocxr.data.readers.rexgradient import read_rexgradient

    readers = {
        "iu": lambda: read_iu(cfg.iu, cfg.iu_images, log),
        "mimic": lambda: read_mimic(cfg.mimic, log, cfg.check_images),
        "chexpert": lambda: read_chexpert(cfg.chexpert, log, check_images=cfg.check_images),
        "rexgradient": lambda: read_rexgradient(cfg.rexgradient, log, cfg.check_images),
    }
    records = []
    for source in SOURCES:
        if getattr(cfg, source):
            records.extend(_progress(readers[source](), f"read {source}"))
    return records


def _labels_dict(findings) -> dict[str, dict]:
    out = {}
    for obs, f in sorted(findings.items()):
        d = f.to_dict()
        d.pop("observation", None)
        out[obs] = d
    return out


def check_target(source, target: dict, language: str) -> list[dict]:
    """Label changes between a study's source labels and one of its target texts (issue 14,
    item 11): `normalize.label_changes` on `label_report` of the target, the Chinese one first
    mapped back to English with `zh.zh_to_en` (the way Chinese generations are scored).

    `source`: Findings of the original report; `target`: {"findings", "impression"}.
    """
    from echocxr.data.labeler import label_report
    from echocxr.data.normalize import label_changes
    from echocxr.data.zh import zh_to_en

    text = f"{target.get('findings') or ''}\n{target.get('impression') or ''}"
    if language == "zh":
        text = zh_to_en(text)
    return label_changes(source, label_report(text))


class _Stats:
    """Counters for the data card, keyed by source."""

    def __init__(self) -> None:
        self.changes: dict[tuple[str, str], list[dict]] = {}  # (study id, language) -> changes
        self.checked: dict[str, set[str]] = defaultdict(set)  # language -> study ids re-labeled
        self.read: Counter = Counter()
        self.dropped: dict[str, Counter] = defaultdict(Counter)  # reason -> source -> n
        self.untranslatable: Counter = Counter()
        self.zh_selected: Counter = Counter()
        self.llm_fallback: Counter = Counter()  # "rewrite"/"translate" -> n

    def drop(self, reason: str, source: str) -> None:
        self.dropped[reason][source] += 1


def build(cfg: BuildConfig, fp: str | None = None) -> dict:
    """Run the whole pipeline; returns the data card (also written to --out).

    `fp` is the inputs' fingerprint when the caller already computed it.
    """
    from echocxr.data.cache import DiskCache
    from echocxr.data.llm import LLMClient, LLMConfig

    t0 = time.perf_counter()
    log, stats = IssueLog(), _Stats()
    llm = None
    if cfg.llm:
        llm = LLMClient(
            LLMConfig.from_env(cfg.llm_url, cfg.llm_model), DiskCache(cfg.cache_path / "llm.sqlite")
        )
    try:
        return _build(cfg, fp, log, stats, llm, t0)
    finally:
        if llm is not None and llm.cache is not None:
            llm.cache.close()


def _build(cfg: BuildConfig, fp: str | None, log: IssueLog, stats: _Stats, llm, t0: float) -> dict:
    from echocxr.data.cache import DiskCache
    from echocxr.data.dedup import DedupConfig, Embedder, deduplicate
    from echocxr.data.labeler import label_report
    from echocxr.data.llm import LLMError, chinese_only
    from echocxr.data.normalize import normalize_report
    from echocxr.data.splits import SplitConfig, assign_splits, balanced_sample, zh_selected
    from echocxr.data.zh import render_zh

    out = Path(cfg.out)

    # 1. Read; a study id seen twice keeps its first record.
    studies: list[Record] = []
    seen: set[str] = set()
    for rec in read_sources(cfg, log):
        stats.read[rec.source] += 1
        if rec.study_id in seen:
            stats.drop("duplicate_study_id", rec.source)
            continue
        seen.add(rec.study_id)
        reason = drop_reason(rec)
        if reason:
            stats.drop(reason, rec.source)
            continue
        studies.append(rec)
    studies.sort(key=lambda r: (SOURCES.index(r.source), study_sort_key(r.study_id)))

    # 2. Labels from the original text; 3. the target text (rules, LLM, or the original).
    normalized: dict[str, dict] = {}
    kept: list[Record] = []
    for rec in _progress(studies, "label + normalize"):
        orig_f, orig_i = rec.original["findings"], rec.original["impression"]
        try:
            findings = label_report(f"{orig_f}\n{orig_i}")
            norm = normalize_report(orig_f, orig_i, findings)
        except Exception as e:  # one odd report must not stop a 200k-study build; it is logged
            log.add(rec.source, rec.meta.get("file", rec.study_id), "labeler_or_normalizer_error", repr(e))
            stats.drop("labeler_or_normalizer_error", rec.source)
            continue
        rec.labels = _labels_dict(findings)
        if llm is not None and cfg.normalize:
            try:
                norm = llm.rewrite(orig_f, orig_i)
            except LLMError as e:
                log.add(rec.source, rec.study_id, "llm_rewrite_failed", str(e))
                stats.llm_fallback["rewrite"] += 1
        if not (norm.get("findings") or "").strip() or not (norm.get("impression") or "").strip():
            stats.drop("empty_after_normalization", rec.source)
            continue
        normalized[rec.study_id] = {
            "findings": norm["findings"].strip(),
            "impression": norm["impression"].strip(),
        }
        if cfg.normalize:  # the original text as the target (--no-normalize) is its own source
            stats.checked["en"].add(rec.study_id)
            changes = check_target(findings, normalized[rec.study_id], "en")
            if changes:
                stats.changes[(rec.study_id, "en")] = changes
        if cfg.normalize:
            rec.findings, rec.impression = (
                normalized[rec.study_id]["findings"],
                normalized[rec.study_id]["impression"],
            )
        else:
            rec.findings, rec.impression = orig_f, orig_i
        kept.append(rec)

    # 4. Splits.
    assign_splits(kept, SplitConfig(cfg.val_frac, cfg.test_frac, cfg.seed))

    # 5. Dedup: training studies only (leakage into eval, then redundancy).
    dedup_card: dict = {"enabled": cfg.dedup}
    embedded = 0
    if cfg.dedup:
        dcfg = DedupConfig(threshold=cfg.dedup_threshold)
        train = [r for r in kept if r.split == "train"]
        evaluation = [r for r in kept if r.split != "train"]
        with DiskCache(cfg.cache_path / "embeddings.sqlite") as cache:
            embedder = Embedder(dcfg, cache, progress=sys.stderr.isatty())
            res = deduplicate(train, evaluation, dcfg, embedder)
            embedded = embedder.computed
        removed = {a for a, _, _ in res.near_eval} | {a for a, _, _ in res.within_train}
        by_id = {r.study_id: r for r in kept}
        for a, _, _ in res.near_eval:
            stats.drop("near_duplicate_of_eval", by_id[a].source)
        for a, _, _ in res.within_train:
            stats.drop("near_duplicate_in_train", by_id[a].source)
        kept = [r for r in kept if r.study_id not in removed]
        dedup_card.update(
            threshold=cfg.dedup_threshold,
            model=Embedder.model_id,
            text="original findings + impression, lower-cased, de-identification marks removed",
            guard="only studies with the same positive/uncertain label signature are compared",
            removed_near_eval=len(res.near_eval),
            removed_within_train=len(res.within_train),
            examples=[
                {"removed": a, "kept": b, "cosine": round(s, 4)}
                for a, b, s in (res.within_train[:5] + res.near_eval[:5])
            ],
            # Every removal with the study it duplicates, so none is lost without a trace.
            removed=[[a, b, round(s, 4), "near_eval"] for a, b, s in res.near_eval]
            + [[a, b, round(s, 4), "within_train"] for a, b, s in res.within_train],
        )

    # 6. Chinese copies.
    zh_records: list[Record] = []
    for rec in _progress(kept, "chinese"):
        if not zh_selected(rec, cfg.zh_share, cfg.seed):
            continue
        stats.zh_selected[rec.source] += 1
        zh = None
        by_rules = llm is None  # zh_to_en reads back only what render_zh writes
        try:
            if llm is not None:
                try:
                    zh = llm.translate_zh(normalized[rec.study_id])
                except LLMError as e:
                    log.add(rec.source, rec.study_id, "llm_translate_failed", str(e))
                    stats.llm_fallback["translate"] += 1
                    zh = render_zh(normalized[rec.study_id], _findings_of(rec))
                    by_rules = True
            else:
                zh = render_zh(normalized[rec.study_id], _findings_of(rec))
        except Exception as e:  # logged and counted like an untranslatable study
            log.add(rec.source, rec.meta.get("file", rec.study_id), "zh_renderer_error", repr(e))
        if zh is None or not all(chinese_only(zh.get(k) or "") for k in ("findings", "impression")):
            stats.untranslatable[rec.source] += 1
            continue
        if by_rules:  # an LLM translation has no exact way back to English to re-label
            stats.checked["zh"].add(rec.study_id)
            changes = check_target(_findings_of(rec), zh, "zh")
            if changes:
                stats.changes[(rec.study_id, "zh")] = changes
        zh_records.append(
            replace(
                rec,
                record_id=f"{rec.study_id}#zh",
                language="zh",
                findings=zh["findings"].strip(),
                impression=zh["impression"].strip(),
                images=list(rec.images),
                labels=dict(rec.labels),
                original=dict(rec.original),
                mesh=list(rec.mesh),
                meta=dict(rec.meta),
            )
        )

    # 7. Write.
    order = {s: i for i, s in enumerate(SPLITS)}

    def sort_key(r: Record):
        return (
            order[r.split],
            SOURCES.index(r.source),
            study_sort_key(r.study_id),
            LANGUAGES.index(r.language),
        )

    corpus = sorted(kept + zh_records, key=sort_key)
    eval_en = balanced_sample([r for r in kept if r.split == "test"], cfg.eval_size, cfg.seed)
    eval_zh = balanced_sample([r for r in zh_records if r.split == "test"], cfg.eval_size, cfg.seed)
    write_jsonl(out / "corpus.jsonl", corpus)
    write_jsonl(out / "eval_en.jsonl", eval_en)
    write_jsonl(out / "eval_zh.jsonl", eval_zh)

    card = _card(cfg, log, stats, corpus, eval_en, eval_zh, dedup_card)
    card["fingerprint"] = fp or fingerprint(cfg)
    _write_text(out / "data_card.json", json.dumps(card, ensure_ascii=False, indent=2, sort_keys=True) + "\n")
    _write_text(out / "data_card.md", card_markdown(card))
    # For the summary only, never written: they differ between a first run and a cached rerun.
    card["_run"] = {
        "seconds": time.perf_counter() - t0,
        "embedded": embedded,
        "llm_requests": llm.requests if llm is not None else 0,
    }
    return card


def _findings_of(rec: Record):
    from echocxr.data.observations import findings_from_json

    return findings_from_json(rec.labels)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _nested_counts(records, *keys) -> dict:
    out: dict = {}
    for r in records:
        d = out
        for k in keys[:-1]:
            d = d.setdefault(getattr(r, k), {})
        last = getattr(r, keys[-1])
        d[last] = d.get(last, 0) + 1
    return out


def _card(cfg, log, stats, corpus, eval_en, eval_zh, dedup_card) -> dict:
    en = [r for r in corpus if r.language == "en"]
    labels: dict[str, Counter] = defaultdict(Counter)
    for r in en:
        for obs, d in r.labels.items():
            labels[obs][d["status"]] += 1
    kept_studies = Counter(r.source for r in en)
    conf = {k: v for k, v in asdict(cfg).items() if k not in ("out", "cache_dir", "force")}
    return {
        "card_version": CARD_VERSION,
        "config": conf,
        "text_target": "llm"
        if (cfg.llm and cfg.normalize)
        else ("normalized" if cfg.normalize else "original"),
        "read": dict(sorted(stats.read.items())),
        "kept_studies": dict(sorted(kept_studies.items())),
        "dropped": {reason: dict(sorted(c.items())) for reason, c in sorted(stats.dropped.items())},
        "records": {
            "total": len(corpus),
            "by_split_language": _nested_counts(corpus, "split", "language"),
            "by_source_split_language": _nested_counts(corpus, "source", "split", "language"),
        },
        "dedup": dedup_card,
        "chinese": {
            "zh_share_train": cfg.zh_share,
            "selected": dict(sorted(stats.zh_selected.items())),
            "written": dict(sorted(Counter(r.source for r in corpus if r.language == "zh").items())),
            "untranslatable": dict(sorted(stats.untranslatable.items())),
        },
        "llm_fallbacks": dict(sorted(stats.llm_fallback.items())),
        "eval": {
            "en": dict(sorted(Counter(r.source for r in eval_en).items())),
            "zh": dict(sorted(Counter(r.source for r in eval_zh).items())),
        },
        "images": {
            "attached": dict(sorted(Counter(r.source for r in en for _ in r.images).items())),
            "missing_on_disk": dict(sorted(log.missing_images.items())),
        },
        "issues": {
            "counts": log.counts(),
            "items": [asdict(i) for i in log.issues],
        },
        "labels": {obs: dict(sorted(c.items())) for obs, c in sorted(labels.items())},
        "consistency": _consistency_card(stats, {r.study_id for r in en}),
    }


def _consistency_card(stats: _Stats, written: set[str]) -> dict:
    """Counts and the full list of label changes between source and target, for written studies."""
    items = [
        {"study_id": sid, "language": lang, **c}
        for (sid, lang), changes in sorted(stats.changes.items())
        if sid in written
        for c in changes
    ]
    studies = {i["study_id"] for i in items}
    by_kind = Counter(i["kind"] for i in items)
    by_obs = Counter(f"{i['observation']} {i['kind']} {i['source']}->{i['target']}" for i in items)
    n = len(written)
    return {
        "rule": "label_report of each target text (EN; ZH through zh_to_en) against the source "
        "report's labels; a negative stated only by the target is not a change",
        "studies": n,
        # written texts only (a study removed by dedup later was checked but is not counted)
        "checked_texts": {lang: len(ids & written) for lang, ids in sorted(stats.checked.items())},
        "studies_with_change": len(studies),
        "rate": round(len(studies) / n, 6) if n else 0.0,
        "by_kind": dict(sorted(by_kind.items())),
        "by_change": dict(by_obs.most_common()),
        "items": items,
    }


def card_markdown(card: dict) -> str:
    """The data card as a readable page."""
    lines = ["# Data card", ""]
    c = card["config"]
    inputs = ", ".join(
        f"{k}: `{c[k]}`" for k in ("iu", "iu_images", "mimic", "chexpert", "rexgradient") if c.get(k)
    )
    lines += [
        f"Inputs: {inputs}",
        f"Target text: {card['text_target']}; Chinese share of training studies: {c['zh_share']}; "
        f"seed {c['seed']}; dedup {'on, threshold ' + str(c['dedup_threshold']) if c['dedup'] else 'off'}.",
        f"Fingerprint: `{card.get('fingerprint', '')[:16]}`",
        "",
        "## Studies",
        "",
        "| source | read | kept |",
        "|---|---:|---:|",
    ]
    for s in sorted(card["read"]):
        lines.append(f"| {s} | {card['read'][s]} | {card['kept_studies'].get(s, 0)} |")
    lines += [
        "",
        "## Dropped (studies, by reason)",
        "",
        "| reason | " + " | ".join(sorted(card["read"])) + " |",
    ]
    lines.append("|---|" + "---:|" * len(card["read"]))
    for reason, by in card["dropped"].items():
        lines.append(f"| {reason} | " + " | ".join(str(by.get(s, 0)) for s in sorted(card["read"])) + " |")
    lines += ["", "## Records (split x language)", "", "| split | en | zh |", "|---|---:|---:|"]
    for split, by in card["records"]["by_split_language"].items():
        lines.append(f"| {split} | {by.get('en', 0)} | {by.get('zh', 0)} |")
    lines.append(f"\nTotal records: {card['records']['total']}")
    d = card["dedup"]
    lines += ["", "## Dedup", ""]
    if d["enabled"]:
        lines += [
            f"- model {d['model']}, cosine >= {d['threshold']}; text: {d['text']}; {d['guard']}",
            f"- removed as near duplicates of val/test studies: {d['removed_near_eval']}",
            f"- removed as near duplicates within train: {d['removed_within_train']}",
        ]
        lines += [f"  - `{e['removed']}` ~ `{e['kept']}` ({e['cosine']})" for e in d["examples"]]
        lines.append("- every removed study with its match: `dedup.removed` in data_card.json")
    else:
        lines.append("- off")
    z = card["chinese"]
    lines += [
        "",
        "## Chinese copies",
        "",
        f"- selected: {z['selected']}; written: {z['written']}; untranslatable (no copy): {z['untranslatable']}",
    ]
    if card["llm_fallbacks"]:
        lines.append(f"- LLM failures that fell back to the rules: {card['llm_fallbacks']}")
    lines += [
        "",
        "## Evaluation sets (test split)",
        "",
        f"- EN: {card['eval']['en']}",
        f"- ZH: {card['eval']['zh']}",
    ]
    lines += [
        "",
        "## Images",
        "",
        f"- attached (EN records): {card['images']['attached']}",
        f"- named by the corpus but absent on disk: {card['images']['missing_on_disk']}",
    ]
    issues = card["issues"]
    lines += ["", "## Parse errors and other issues", ""]
    if not issues["items"]:
        lines.append("None.")
    else:
        lines.append(f"Counts: {issues['counts']}")
        lines.append("")
        shown = issues["items"][:200]
        lines += [f"- [{i['source']}] `{i['file']}`: {i['problem']} {i['detail']}".rstrip() for i in shown]
        if len(issues["items"]) > len(shown):
            lines.append(f"- ... {len(issues['items']) - len(shown)} more in data_card.json")
    cons = card["consistency"]
    lines += [
        "",
        "## Consistency: source labels vs. labels of the target text",
        "",
        f"Rule: {cons['rule']}.",
        "",
        f"- studies written: {cons['studies']}; target texts re-labeled: {cons['checked_texts']}",
        f"- studies with a change: {cons['studies_with_change']} ({cons['rate']:.2%}); by kind: {cons['by_kind']}",
    ]
    lines += [f"  - {k}: {v}" for k, v in cons["by_change"].items()]
    if not cons["items"]:
        lines.append("- no study changed a label")
    lines += [
        f"- `{i['study_id']}` ({i['language']}): {i['observation']} {i['kind']} "
        f"({i['source']} -> {i['target']})"
        for i in cons["items"]
    ]
    lines += [
        "",
        "## Labels (EN records)",
        "",
        "| observation | positive | negative | uncertain |",
        "|---|---:|---:|---:|",
    ]
    for obs, by in card["labels"].items():
        lines.append(
            f"| {obs} | {by.get('positive', 0)} | {by.get('negative', 0)} | {by.get('uncertain', 0)} |"
        )
    return "\n".join(lines) + "\n"


def summary(card: dict, out: str, run: dict | None = None) -> str:
    r = card["records"]["by_split_language"]
    parts = [f"{s}: " + "/".join(f"{n} {lang}" for lang, n in sorted(r[s].items())) for s in r]
    dropped = sum(sum(v.values()) for v in card["dropped"].values())
    lines = [
        f"read {sum(card['read'].values())} studies {card['read']}; kept {sum(card['kept_studies'].values())}; "
        f"dropped {dropped}",
        f"records {card['records']['total']} ({'; '.join(parts)})",
        f"untranslatable {sum(card['chinese']['untranslatable'].values())}; "
        f"eval sets: EN {sum(card['eval']['en'].values())}, ZH {sum(card['eval']['zh'].values())}; "
        f"issues {sum(sum(v.values()) for v in card['issues']['counts'].values())}",
    ]
    if card["dedup"]["enabled"]:
        lines.append(
            f"dedup: {card['dedup']['removed_near_eval']} near eval, {card['dedup']['removed_within_train']} within train"
        )
    cons = card.get("consistency")
    if cons:
        lines.append(
            f"label consistency: {cons['studies_with_change']} of {cons['studies']} studies "
            f"({cons['rate']:.2%}) changed a label in the target text (listed in data_card.md)"
        )
    if run:
        lines.append(f"embedded {run['embedded']} new texts; {run['llm_requests']} LLM requests")
        lines.append(
            f"wrote {out}/corpus.jsonl, eval_en.jsonl, eval_zh.jsonl, data_card.md in {run['seconds']:.1f} s"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = argparse.Namespace(**{f.name: f.default for f in fields(BuildConfig) if f.name != "out"})
    src = parser.add_argument_group("corpora (at least one)")
    src.add_argument("--iu", help="IU X-ray NLMCXR_reports.tgz or its extracted folder")
    src.add_argument("--iu-images", help="folder of IU PNGs named <image id>.png")
    src.add_argument("--mimic", help="MIMIC-CXR folder (files/pXX/... reports, metadata and split CSVs)")
    src.add_argument("--chexpert", help="CheXpert-Plus df_chexpert_plus_*.csv (or its folder)")
    src.add_argument("--rexgradient", help="ReXGradient-160K folder, metadata/ folder or one metadata table")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--zh-share", type=float, default=d.zh_share, help="share of train studies with a Chinese copy"
    )
    parser.add_argument(
        "--dedup-threshold", type=float, default=d.dedup_threshold, help="cosine for near duplicates"
    )
    parser.add_argument("--no-dedup", action="store_true", help="skip semantic dedup")
    parser.add_argument("--no-normalize", action="store_true", help="original text as the target (ablation)")
    parser.add_argument("--eval-size", type=int, default=d.eval_size, help="records per evaluation language")
    parser.add_argument(
        "--llm", action="store_true", help="rewrite/translate with the LLM endpoint (ECHOCXR_LLM_*)"
    )
    parser.add_argument("--llm-url", help="OpenAI-compatible endpoint (default $ECHOCXR_LLM_URL)")
    parser.add_argument("--llm-model", help="model name (default $ECHOCXR_LLM_MODEL)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--val-frac", type=float, default=d.val_frac, help="val share where no official split"
    )
    parser.add_argument(
        "--test-frac", type=float, default=d.test_frac, help="test share where no official split"
    )
    parser.add_argument("--no-image-check", action="store_true", help="only test that images exist")
    parser.add_argument("--cache-dir", help="embedding/LLM cache (default OUT/.cache)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the outputs are up to date")


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    return BuildConfig(
        out=args.out,
        iu=args.iu,
        iu_images=args.iu_images,
        mimic=args.mimic,
        chexpert=args.chexpert,
        rexgradient=args.rexgradient,
        zh_share=args.zh_share,
        dedup=not args.no_dedup,
        dedup_threshold=args.dedup_threshold,
        normalize=not args.no_normalize,
        eval_size=args.eval_size,
        llm=args.llm,
        llm_url=args.llm_url,
        llm_model=args.llm_model,
        seed=args.seed,
        val_frac=args.val_frac,
        test_frac=args.test_frac,
        check_images=not args.no_image_check,
        cache_dir=args.cache_dir,
        force=args.force,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    t0 = time.perf_counter()
    fp = fingerprint(cfg)
    if not cfg.force and up_to_date(cfg, fp):
        card = json.loads((Path(cfg.out) / "data_card.json").read_text(encoding="utf-8"))
        print(f"up to date (fingerprint {fp[:16]}); nothing to do. Use --force to rebuild.")
        print(summary(card, cfg.out))
        print(f"checked in {time.perf_counter() - t0:.1f} s")
        return 0
    card = build(cfg, fp)
    print(summary(card, cfg.out, card.pop("_run")))
    return 0
