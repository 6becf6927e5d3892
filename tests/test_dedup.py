"""Semantic dedup: the greedy pass against a brute-force loop, and the real MiniLM on a few reports."""

from __future__ import annotations

import numpy as np

from echocxr.data.cache import DiskCache
from echocxr.data.dedup import (
    DedupConfig,
    Embedder,
    cross_duplicates,
    dedup_text,
    deduplicate,
    greedy_duplicates,
    label_signature,
)
from echocxr.data.records import Record


def _brute_greedy(emb, th):
    kept, out = [], []
    for i in range(len(emb)):
        sims = [(float(emb[i] @ emb[k]), k) for k in kept]
        best = max(sims, default=(-1.0, -1))
        if best[0] >= th:
            out.append(best[1])
        else:
            kept.append(i)
            out.append(None)
    return out


def test_greedy_matches_brute_force_across_chunks():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(12, 16))
    # Noisy copies of a few base vectors make real near-duplicate clusters.
    x = np.concatenate(
        [base, base[:6] + 0.05 * rng.normal(size=(6, 16)), base[:3] + 0.3 * rng.normal(size=(3, 16))]
    )
    x = x[rng.permutation(len(x))].astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for th in (0.9, 0.99):
        want = _brute_greedy(x, th)
        for chunk in (1, 4, 7, 100):
            got = [None if h is None else h[0] for h in greedy_duplicates(x, th, chunk)]
            assert got == want, (th, chunk)
    assert any(h is not None for h in greedy_duplicates(x, 0.9))


def test_cross_duplicates():
    a = np.eye(3, dtype=np.float32)
    ref = np.array([[0, 1, 0], [0.6, 0.8, 0]], dtype=np.float32)
    hits = cross_duplicates(a, ref, 0.95)
    assert hits[0] is None and hits[1][0] == 0 and hits[2] is None
    assert cross_duplicates(a, ref[:0], 0.5) == [None, None, None]


def _rec(sid, findings, impression, labels=None):
    return Record(
        sid,
        sid,
        "iu",
        findings=findings,
        impression=impression,
        labels=labels or {},
        original={"findings": findings, "impression": impression, "text": ""},
    )


def test_dedup_text_uses_original_and_drops_deid_marks():
    r = _rec("iu:CXR1", "The XXXX are  clear.", "Normal chest x-XXXX. ___")
    r.findings = "Normalized text that must not be used."
    assert dedup_text(r) == "the are clear. normal chest x- ."


def test_label_signature_ignores_negatives_keeps_laterality():
    a = _rec("a", "", "", {"pleural_effusion": {"status": "positive", "laterality": "left"}})
    b = _rec("b", "", "", {"pleural_effusion": {"status": "positive", "laterality": "right"}})
    c = _rec("c", "", "", {"pneumothorax": {"status": "negative"}})
    d = _rec("d", "", "", {})
    assert label_signature(a) != label_signature(b)
    assert label_signature(c) == label_signature(d)


def test_deduplicate_with_minilm_and_cache(tmp_path):
    normal = "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear."
    eff = {"pleural_effusion": {"status": "positive", "laterality": "right"}}
    train = [
        _rec("iu:CXR1", normal, "No acute disease."),
        _rec("iu:CXR2", normal.replace("unremarkable", "stable"), "No acute disease."),  # near dup of 1
        _rec("iu:CXR3", "Small right pleural effusion.", "Right effusion.", eff),
        _rec("iu:CXR4", normal, "No acute disease.", eff),  # same words, different labels: kept
        _rec("iu:CXR5", "Large left upper lobe mass with hilar adenopathy.", "Suspicious mass."),
        _rec("iu:CXR6", "Small right pleural effusion.", "Right effusion.", eff),  # copy of 3 ...
        # Alone in its label signature: nothing to compare with, so never embedded.
        _rec(
            "iu:CXR7", "Large left pneumothorax.", "Pneumothorax.", {"pneumothorax": {"status": "positive"}}
        ),
    ]
    evaluation = [_rec("iu:CXR9", "Small right pleural effusion.", "Right effusion.", eff)]  # ... and of eval
    cfg = DedupConfig(threshold=0.97)
    with DiskCache(tmp_path / "emb.sqlite") as cache:
        emb = Embedder(cfg, cache, progress=False)
        res = deduplicate(train, evaluation, cfg, emb)
        assert emb.computed == 4  # 7 compared texts, 4 distinct; CXR7 not embedded
    assert [r.study_id for r in res.kept] == ["iu:CXR1", "iu:CXR4", "iu:CXR5", "iu:CXR7"]
    assert [(a, b) for a, b, _ in res.near_eval] == [("iu:CXR3", "iu:CXR9"), ("iu:CXR6", "iu:CXR9")]
    assert [(a, b) for a, b, _ in res.within_train] == [("iu:CXR2", "iu:CXR1")]
    assert all(s >= 0.97 for _, _, s in res.within_train + res.near_eval)

    with DiskCache(tmp_path / "emb.sqlite") as cache:
        emb2 = Embedder(cfg, cache, progress=False)
        res2 = deduplicate(train, evaluation, cfg, emb2)
        assert emb2.computed == 0 and emb2._model is None  # all from the cache, model never loaded
    assert res2.near_eval == res.near_eval and res2.within_train == res.within_train
