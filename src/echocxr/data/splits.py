"""Train/val/test assignment, the Chinese-copy selection and the evaluation sets.

Everything is a function of ids and the seed (a SHA-256 hash, never Python's salted `hash`), so a
study keeps its split and its Chinese copy across runs, machines and corpus subsets.

Official splits are kept where a corpus has them (MIMIC-CXR, CheXpert-Plus, ReXGradient). A
corpus without an official test split (CheXpert-Plus: train/valid only) gets one carved from its
official train part by patient hash; official val/test studies never move to train. Hash splits
use the patient id where known, so one patient's studies stay on one side.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from echocxr.data.readers import study_sort_key
from echocxr.data.records import Record


@dataclass(frozen=True)
class SplitConfig:
    val_frac: float = 0.05
    test_frac: float = 0.10
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.val_frac and 0 <= self.test_frac and self.val_frac + self.test_frac < 1):
            raise ValueError(f"bad split fractions val={self.val_frac} test={self.test_frac}")


def unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) from the parts, stable across processes and machines."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def hash_split(key: str, cfg: SplitConfig, allowed: tuple[str, ...] = ("train", "val", "test")) -> str:
    """Split of a group key by hash; `allowed` limits the outcome (e.g. carve only a test part)."""
    u = unit_hash("split", cfg.seed, key)
    if "test" in allowed and u < cfg.test_frac:
        return "test"
    if "val" in allowed and cfg.test_frac <= u < cfg.test_frac + cfg.val_frac:
        return "val"
    return "train"


def group_key(rec: Record) -> str:
    """The unit that must not straddle splits: the patient where known, else the study."""
    patient = rec.meta.get("patient_id")
    return f"{rec.source}:patient:{patient}" if patient else rec.study_id


def assign_splits(records: list[Record], cfg: SplitConfig) -> None:
    """Set `split` on every record (in place)."""
    official_by_source: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.meta.get("official_split"):
            official_by_source[r.source].add(r.meta["official_split"])
    for r in records:
        official = r.meta.get("official_split")
        if not official:
            r.split = hash_split(group_key(r), cfg)
        elif official == "train":
            missing = tuple(s for s in ("val", "test") if s not in official_by_source[r.source])
            r.split = hash_split(group_key(r), cfg, ("train", *missing)) if missing else "train"
        else:
            r.split = official


def zh_selected(rec: Record, share: float, seed: int) -> bool:
    """Whether a study gets a Chinese copy: all val/test studies, a hashed share of train."""
    if rec.split != "train":
        return True
    return unit_hash("zh", seed, rec.study_id) < share


def balanced_sample(records: Iterable[Record], size: int, seed: int) -> list[Record]:
    """Up to `size` records, as even across sources as the sources allow.

    Each source's records are shuffled by hash, then taken round-robin, so a small source gives
    all it has and the rest is shared among the larger ones. Returned in corpus order.
    """
    by_source: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_source[r.source].append(r)
    queues = [
        sorted(rs, key=lambda r: unit_hash("eval", seed, r.record_id)) for _, rs in sorted(by_source.items())
    ]
    picked: list[Record] = []
    depth = 0
    while len(picked) < size and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(picked) < size:
                picked.append(q[depth])
        depth += 1
    return sorted(picked, key=lambda r: (r.source, study_sort_key(r.study_id)))
