"""Phantom renderer: determinism, each finding visible where it should be, tolerant input, CLI."""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import pytest

from echocxr.data.observations import OBSERVATIONS, Finding
from echocxr.data.phantom import (
    MAX_SIZE,
    MIN_SIZE,
    PhantomWarning,
    _Canvas,
    _draw_anatomy,
    _draw_pose,
    _sample_vessels,
    _sample_vessels_reference,
    findings_for_record,
    keep_freed_memory,
    render_phantom,
    resolve_findings,
    study_seed,
)
from echocxr.data.records import Record
from echocxr.errors import UserError

SIZE = 160


def pos(obs: str, **attrs) -> dict[str, Finding]:
    return {obs: Finding(obs, "positive", **attrs)}


def coords(seed: int, size: int = SIZE):
    """Patient coordinates (U across, V down) of each frontal pixel and the render's anatomy."""
    pose = _draw_pose(np.random.default_rng([seed, 3, 0]), "frontal")
    cv = _Canvas(size, pose)
    return cv.U, cv.V, _draw_anatomy(np.random.default_rng([seed, 2]))


def region_mean(img: np.ndarray, mask: np.ndarray) -> float:
    assert mask.sum() > 20, "test region too small"
    return float(img[mask].astype(np.float64).mean())


def test_shape_dtype_and_size_range():
    for size in (MIN_SIZE, 224, MAX_SIZE):
        for view in ("frontal", "lateral"):
            img = render_phantom({}, view=view, size=size, seed=1)
            assert img.shape == (size, size) and img.dtype == np.uint8
            assert img.std() > 20  # not a blank frame
    with pytest.raises(ValueError):
        render_phantom({}, size=MIN_SIZE - 1, seed=0)
    with pytest.raises(ValueError):
        render_phantom({}, view="oblique", seed=0)


def test_same_seed_same_bytes_other_seed_differs():
    f = pos("cardiomegaly") | pos("pleural_effusion", laterality="left")
    a = render_phantom(f, size=SIZE, seed=7)
    assert a.tobytes() == render_phantom(f, size=SIZE, seed=7).tobytes()
    assert a.tobytes() != render_phantom(f, size=SIZE, seed=8).tobytes()
    # Epochs give other seeds, so training sees fresh nuisance variation of the same study.
    s0, s1, ev = study_seed("iu:CXR1", 0, 0), study_seed("iu:CXR1", 0, 1), study_seed("iu:CXR1", 0)
    assert len({s0, s1, ev}) == 3 and ev == study_seed("iu:CXR1", 0, None)


def test_every_observation_renders_and_changes_the_image():
    normal = render_phantom({}, size=SIZE, seed=11)
    for obs in OBSERVATIONS:
        if obs == "no_finding":
            continue
        for view in ("frontal", "lateral"):
            img = render_phantom(pos(obs), view=view, size=SIZE, seed=11)
            assert img.shape == (SIZE, SIZE)
        img = render_phantom(pos(obs), size=SIZE, seed=11)
        # Small findings (a granuloma, a rib fracture) change few pixels, but strongly.
        assert (np.abs(img.astype(int) - normal) > 8).sum() >= 8, obs


@pytest.mark.parametrize("seed", [3, 21])
def test_effusion_brightens_the_affected_base(seed):
    U, V, anat = coords(seed)
    normal = render_phantom({}, size=SIZE, seed=seed)
    eff = render_phantom(
        pos("pleural_effusion", laterality="right", severity="moderate"), size=SIZE, seed=seed
    )
    # Patient's right = image left (U < 0); the costophrenic region above the dome.
    right_base = (U < -0.45) & (U > -0.8) & (V > anat.dome_r - 0.15) & (V < anat.dome_r - 0.02)
    left_base = (U > 0.45) & (U < 0.8) & (V > anat.dome_l - 0.15) & (V < anat.dome_l - 0.02)
    gain_right = region_mean(eff, right_base) - region_mean(normal, right_base)
    gain_left = region_mean(eff, left_base) - region_mean(normal, left_base)
    assert gain_right > 25 and abs(gain_left) < 5


@pytest.mark.parametrize("seed", [4, 30])
def test_cardiomegaly_widens_the_heart(seed):
    U, V, anat = coords(seed)
    normal = render_phantom({}, size=SIZE, seed=seed)
    big = render_phantom(pos("cardiomegaly", severity="moderate"), size=SIZE, seed=seed)
    # Just outside the normal left heart border, at mid-heart height.
    beyond = (U > anat.heart_l + 0.04) & (U < anat.heart_l + 0.12) & (np.abs(V - anat.heart_v) < 0.08)
    assert region_mean(big, beyond) - region_mean(normal, beyond) > 25

    def heart_width(img):
        row = img[np.abs(V - anat.heart_v) < 0.02].reshape(-1)
        return (row > np.percentile(img, 70)).sum()

    assert heart_width(big) > heart_width(normal)


@pytest.mark.parametrize("seed", [5, 40])
def test_pneumothorax_darkens_the_lung_periphery(seed):
    U, V, anat = coords(seed)
    normal = render_phantom({}, size=SIZE, seed=seed)
    ptx = render_phantom(pos("pneumothorax", laterality="left", severity="severe"), size=SIZE, seed=seed)
    med, lat = anat.medial_edge(V), anat.lateral_edge(V)
    t = (np.abs(U) - med) / np.maximum(
        lat - med, 1e-3
    )  # 0 at the mediastinal edge of a lung, 1 at the chest wall
    band = (t > 0.7) & (t < 0.95) & (V > 0.3) & (V < 0.6)
    periphery, mirror = band & (U > 0), band & (U < 0)
    assert region_mean(ptx, periphery) < region_mean(normal, periphery) - 3
    assert abs(region_mean(ptx, mirror) - region_mean(normal, mirror)) < 1


def test_consolidation_follows_zone_and_side():
    seed = 9
    U, V, _ = coords(seed)
    normal = render_phantom({}, size=SIZE, seed=seed)
    upper = render_phantom(pos("consolidation", laterality="left", zone="upper"), size=SIZE, seed=seed)
    lower = render_phantom(pos("consolidation", laterality="left", zone="lower"), size=SIZE, seed=seed)
    up_box = (U > 0.3) & (U < 0.75) & (V > 0.12) & (V < 0.32)
    low_box = (U > 0.3) & (U < 0.75) & (V > 0.62) & (V < 0.78)
    d_up = region_mean(upper, up_box) - region_mean(normal, up_box)
    d_low = region_mean(lower, low_box) - region_mean(normal, low_box)
    assert d_up > 10 and d_low > 10
    assert region_mean(upper, low_box) - region_mean(normal, low_box) < d_low / 2


def test_resolve_fills_attributes_deterministically():
    r1 = resolve_findings(pos("pleural_effusion"), seed=3)
    r2 = resolve_findings(pos("pleural_effusion"), seed=3)
    assert r1 == r2 and r1["pleural_effusion"].laterality in ("left", "right", "bilateral")
    # Stated attributes are kept.
    kept = resolve_findings(pos("pleural_effusion", laterality="left", severity="severe"), seed=3)
    assert kept["pleural_effusion"].laterality == "left" and kept["pleural_effusion"].severity == "severe"
    # Negative findings draw nothing.
    neg = {"pneumothorax": Finding("pneumothorax", "negative")}
    assert resolve_findings(neg, seed=0) == {}
    assert render_phantom(neg, size=SIZE, seed=2).tobytes() == render_phantom({}, size=SIZE, seed=2).tobytes()


def test_bad_findings_warn_and_are_ignored():
    ok = pos("cardiomegaly", severity="moderate")
    ref = render_phantom(ok, size=SIZE, seed=1)
    with pytest.warns(PhantomWarning, match="unknown observation 'dragon'"):
        img = render_phantom(ok | {"dragon": {"status": "positive"}}, size=SIZE, seed=1)
    assert img.tobytes() == ref.tobytes()
    with pytest.warns(PhantomWarning, match="unknown laterality 'middle'"):
        render_phantom({"pleural_effusion": {"laterality": "middle"}}, size=SIZE, seed=1)
    with pytest.warns(PhantomWarning, match="unknown attribute 'colour'"):
        render_phantom({"nodule": {"observation": "lung_lesion", "colour": "red"}}, size=SIZE, seed=1)
    with pytest.warns(PhantomWarning, match="not a Finding"):
        render_phantom({"cardiomegaly": 3}, size=SIZE, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        render_phantom(ok, size=SIZE, seed=1)  # valid input warns about nothing


def test_findings_for_record_iu_mesh_and_labels():
    iu = Record(
        "iu:X",
        "iu:X",
        "iu",
        mesh=["Cardiomegaly/mild", "Pleural Effusion/right", "Technical Quality of Image Unsatisfactory"],
        findings="Heart size is mildly enlarged, unchanged from prior.",
    )
    f, nr = findings_for_record(iu)
    assert f["cardiomegaly"].status == "positive" and "pleural_effusion" in f
    assert any(x.startswith("comparison with a prior study") for x in nr)
    other = Record(
        "mimic:1",
        "mimic:1",
        "mimic",
        labels={
            "edema": {"status": "positive", "severity": "mild"},
            "pneumothorax": {"status": "negative"},
            "lung_lesion": {"status": "positive", "subtype": "banana"},
        },
    )
    f, nr = findings_for_record(other)
    assert set(f) == {"edema", "lung_lesion"} and f["lung_lesion"].subtype is None
    assert any("banana" in x for x in nr)


def test_cli_writes_identical_pngs(iu_archive, tmp_path):
    from echocxr.data import phantom

    def run(out):
        args = argparse.Namespace(
            iu=str(iu_archive),
            out=str(out),
            limit=3,
            seed=5,
            size=112,
            views="frontal,lateral",
            finding=None,
        )
        assert phantom.run(args) == 0
        return sorted(p.name for p in out.iterdir())

    names = run(tmp_path / "a")
    assert names == run(tmp_path / "b")
    assert len([n for n in names if n.endswith(".png")]) == 6 and "findings.jsonl" in names
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()
    rows = [json.loads(x) for x in (tmp_path / "a" / "findings.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("report" in r and "not_renderable" in r for r in rows)
    bad = argparse.Namespace(
        iu=str(iu_archive),
        out=str(tmp_path / "c"),
        limit=1,
        seed=0,
        size=112,
        views="top",
        finding=None,
    )
    with pytest.raises(UserError, match="--views"):
        phantom.run(bad)


# --------------------------------------------------------------------------------------------
# echocxr bench phantoms (a tiny smoke version; the real run is documented in docs/PHANTOMS.md)
# --------------------------------------------------------------------------------------------


def _labelled(n: int, prefix: str) -> list[Record]:
    """Half the studies with a bilateral effusion, half normal (labels, as for non-IU sources)."""
    effusion = {"pleural_effusion": {"status": "positive", "laterality": "bilateral", "severity": "moderate"}}
    return [
        Record(f"{prefix}{i}", f"{prefix}{i}", "mimic", labels=effusion if i % 2 else {}) for i in range(n)
    ]


def test_bench_learns_an_effusion_and_shuffled_labels_do_not():
    import torch

    from echocxr.bench.phantoms import BenchConfig, Study, label_vector, learnability

    torch.manual_seed(0)

    def studies(recs):
        return [Study(r, label_vector(findings_for_record(r)[0])) for r in recs]

    train, test = studies(_labelled(64, "tr")), studies(_labelled(32, "te"))
    cfg = BenchConfig(size=MIN_SIZE, epochs=3, width=8, batch_size=16, lr=5e-3)
    res = learnability(train, test, cfg, log=lambda m: None)
    per = res["per_finding"]
    assert set(per) == {"pleural_effusion"} and per["pleural_effusion"]["train_pos"] == 32
    assert per["pleural_effusion"]["auroc"] > 0.85
    shuffled = learnability(train, test, replace_cfg(cfg, shuffle_labels=True), log=lambda m: None)
    # Permuted training labels carry no signal (seeds 0-3 gave 0.43-0.63 vs 0.97-1.00 above).
    assert shuffled["per_finding"]["pleural_effusion"]["auroc"] < 0.8


def replace_cfg(cfg, **kw):
    from dataclasses import replace

    return replace(cfg, **kw)


def test_bench_cli_speed_and_renderability(iu_archive, tmp_path, capsys):
    from echocxr.bench import phantoms as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "b.jsonl"
    args = parser.parse_args(
        ["--iu", str(iu_archive), "--speed-only", "--speed-n", "5", "--speed-size", "112", "--out", str(out)]
    )
    assert bench.run(args) == 0
    res = json.loads(out.read_text().splitlines()[0])
    assert res["speed"]["renders"] == 5 and res["speed"]["per_cpu_second"] > 0
    assert isinstance(res["speed"]["heap_kept"], bool)
    default = res["speed"]["per_cpu_second_default_allocator"]
    assert default is None or default > 0
    r = res["renderability"]
    assert r["studies"] == 3555 and 0 < r["with_unmapped_mesh"] < r["studies"]
    assert "learnability" not in res
    with pytest.raises(UserError, match="--size"):
        bench.run(parser.parse_args(["--iu", str(iu_archive), "--size", "40"]))


def test_lateral_effusion_fills_the_posterior_base():
    seed = 6
    pose = _draw_pose(np.random.default_rng([seed, 3, 1]), "lateral")
    cv = _Canvas(SIZE, pose)
    W, V, anat = cv.U, cv.V, _draw_anatomy(np.random.default_rng([seed, 2]))
    normal = render_phantom({}, view="lateral", size=SIZE, seed=seed)
    eff = render_phantom(
        pos("pleural_effusion", laterality="bilateral", severity="moderate"),
        view="lateral",
        size=SIZE,
        seed=seed,
    )
    top = min(anat.dome_r, anat.dome_l)
    base = (W > 0.1) & (W < 0.45) & (V > top - 0.25) & (V < top - 0.08)
    apex = (W > -0.2) & (W < 0.3) & (V > 0.15) & (V < 0.35)
    assert region_mean(eff, base) - region_mean(normal, base) > 15
    assert abs(region_mean(eff, apex) - region_mean(normal, apex)) < 2


@pytest.mark.parametrize("subtype", ["rib", "clavicle", "spine"])
def test_fracture_brightens_its_site_on_the_stated_side(subtype):
    """A rib or clavicle fracture on the right (image left) adds bright callus or an overriding
    fragment there and leaves the left hemithorax alone; a vertebral fracture adds a sclerotic band
    on the spine (the midline)."""
    seed = 11
    U, V, _ = coords(seed)
    normal = render_phantom({}, size=SIZE, seed=seed).astype(float)
    frac = render_phantom(pos("fracture", laterality="right", subtype=subtype), size=SIZE, seed=seed).astype(
        float
    )
    diff = frac - normal
    brighter = diff > 30
    assert brighter.sum() >= 12  # a callus of a few pixels across at least
    if subtype == "spine":
        assert np.abs(U[brighter]).max() < 0.15
    else:
        assert (U[brighter] < 0).all() and np.abs(diff[U > 0.1]).max() < 5
        if subtype == "clavicle":
            assert V[brighter].max() < 0.2  # up at the clavicle (V 0 at the apices, about 1 at the domes)


@pytest.mark.parametrize("size", [MIN_SIZE, 224, MAX_SIZE])
def test_vessel_resample_matches_the_reference_gather(size):
    # The fast path (one PIL affine resample) against per-pixel texel indices from U, V: the
    # two may pick the neighbouring texel where a pixel centre falls on a texel edge.
    for seed in range(12):
        pose = _draw_pose(np.random.default_rng([seed, 3, 0]), "frontal")
        anat = _draw_anatomy(np.random.default_rng([seed, 2]))
        cv = _Canvas(size, pose)
        fast, ref = _sample_vessels(cv, anat), _sample_vessels_reference(cv, anat)
        assert fast.shape == ref.shape == (size, size) and fast.dtype == np.float32
        assert ref.max() > 0.5, "the vessel map should cover the lungs"
        assert (fast != ref).mean() < 2e-3
        assert np.abs(fast - ref).mean() < 1e-3


def test_keep_freed_memory_runs_once_and_says_whether_it_applied():
    import platform

    first = keep_freed_memory()
    assert keep_freed_memory() is first  # once per process
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert first is glibc
