"""Image-blind controls of `echocxr eval`: the derangement, the blank image, and that a reader that
really reads its image loses its grounding score under both controls while the truth stays put."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from echocxr.data.observations import DISPLAY
from echocxr.data.records import ImageRef, Record
from echocxr.errors import UserError
from echocxr.eval import evaluate as ev
from echocxr.eval.metrics import compute

MESH = [
    ["Cardiomegaly"],
    ["Pleural Effusion/right"],
    ["normal"],
    ["Pneumothorax/left"],
    ["Calcified Granuloma/lung/right/upper lobe"],
    ["Cardiomegaly", "Pleural Effusion/right"],
]
SIZE, VIEWS, ROOT = 112, ("frontal",), Path(".")


def _records(n: int, copies: int = 1) -> list[Record]:
    return [
        Record(
            record_id=f"iu:CXR{i}" + (f"#{c}" if c else ""),
            study_id=f"iu:CXR{i}",
            source="iu",
            split="test",
            findings="",
            impression="",
            mesh=MESH[i % len(MESH)],
            images=[ImageRef(f"missing{i}.png", "PA")],
        )
        for i in range(n)
        for c in range(copies)
    ]


def test_shuffled_donors_is_a_seeded_derangement():
    for n in (2, 3, 7, 40):
        records = _records(n)
        donors = ev.shuffled_donors(records, seed=3)
        assert all(donors[r.record_id].study_id != r.study_id for r in records)  # no fixed point
        assert sorted(d.study_id for d in donors.values()) == sorted(r.study_id for r in records)  # bijective
        assert {k: d.study_id for k, d in donors.items()} == {
            k: d.study_id for k, d in ev.shuffled_donors(records, seed=3).items()
        }
    assert {k: d.study_id for k, d in ev.shuffled_donors(_records(40), 3).items()} != {
        k: d.study_id for k, d in ev.shuffled_donors(_records(40), 4).items()
    }
    # Two records of one study (e.g. EN and ZH): never each other's donor, one donor between them.
    twins = ev.shuffled_donors(_records(5, copies=2), seed=0)
    for i in range(5):
        assert twins[f"iu:CXR{i}"].study_id == twins[f"iu:CXR{i}#1"].study_id != f"iu:CXR{i}"
    with pytest.raises(UserError, match="at least 2 studies"):
        ev.shuffled_donors(_records(1, copies=2), seed=0)


def test_blank_control_is_constant_and_keeps_the_input_shape():
    record = _records(1)[0]
    real, _, _ = ev.eval_images(record, size=SIZE, seed=0, source="phantom", views=VIEWS, root=ROOT)
    blank, src, origin = ev.eval_images(
        record, size=SIZE, seed=0, source="blank", views=("frontal", "lateral"), root=ROOT
    )
    assert src == "blank" and origin is None and len(blank) == 2
    for img in blank:
        assert img.mode == real[0].mode and img.size == real[0].size
        assert np.unique(np.asarray(img)).tolist() == [ev.BLANK_LEVEL]
    with pytest.raises(UserError, match="image-source"):
        ev.EvalConfig(ckpt="c", corpus="c", out="o", image_source="black")


def _report(truth: dict) -> str:
    """The report a perfect reader writes for a phantom drawn with `truth`."""
    found = [o for o in truth if o != "no_finding"]
    if not found:
        return "No acute cardiopulmonary abnormality."
    return " ".join(f"{DISPLAY[o].capitalize()}." for o in found)


def test_a_reader_of_the_image_scores_high_on_real_and_low_on_both_controls():
    # The reader is a pure function of the pixels: it finds the eval phantom nearest to its input
    # and reports what that phantom was drawn with. On its own image it is perfect; shown another
    # study's image (or a blank one) it reports that image's findings, not the study's.
    records = _records(24)
    gallery = [
        np.asarray(
            ev.record_images(r, size=SIZE, seed=0, source="phantom", views=VIEWS, root=ROOT)[0][0], float
        )
        for r in records
    ]
    reports = [_report(ev.phantom_truth(r, 0)) for r in records]

    def reader(images) -> str:
        x = np.asarray(images[0], float)
        return reports[int(np.argmin([np.abs(x - g).mean() for g in gallery]))]

    truth = [ev.phantom_truth(r, 0) for r in records]
    donors = ev.shuffled_donors(records, seed=0)
    scores = {}
    for source in ("phantom", "shuffled", "blank"):
        hyps = []
        for r in records:
            imgs, used, origin = ev.eval_images(
                r, size=SIZE, seed=0, source=source, views=VIEWS, root=ROOT, donor=donors[r.record_id]
            )
            expected = {"phantom": r.study_id, "shuffled": donors[r.record_id].study_id, "blank": None}
            assert used == source and origin == expected[source]
            hyps.append(reader(imgs))
        result = compute("phantom_grounding", hyps, [""] * len(hyps), truth=truth, min_positives=(4,))
        scores[source] = result.aggregate["phantom_abn_macro_f1@4"]
    # the truth scored against never moved: it is each study's own phantom truth
    assert truth == [ev.phantom_truth(r, 0) for r in records]
    assert scores["phantom"] == 1.0
    assert scores["shuffled"] < 0.5 and scores["blank"] < 0.5, scores


def test_cli_accepts_the_control_sources():
    import argparse

    parser = argparse.ArgumentParser()
    ev.add_arguments(parser)
    for source in ev.IMAGE_SOURCES:
        args = parser.parse_args(["--ckpt", "c", "--corpus", "c", "--out", "o", "--image-source", source])
        cfg = ev.config_from_args(args)
        assert cfg.image_source == source and f"--image-source {source}" in " ".join(ev.cli_args(cfg))
    with pytest.raises(SystemExit):
        parser.parse_args(["--ckpt", "c", "--corpus", "c", "--out", "o", "--image-source", "black"])
