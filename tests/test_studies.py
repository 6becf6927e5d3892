"""Study discovery (`data.studies`): a DICOM folder of 20 studies with mixed vendors' view tags,
a stray SR and a corrupt file; CSV manifests; corpus JSONL; view selection."""

from __future__ import annotations

import numpy as np
import pytest

from echocxr.data.studies import discover, select_views
from echocxr.errors import UserError

pydicom = pytest.importorskip("pydicom")

# Per study kind: (frontal tags, lateral tags). Vendors differ in which tag states the view.
VENDOR_TAGS = [
    ({"ViewPosition": "PA"}, {"ViewPosition": "LL"}),  # ViewPosition present
    ({"PatientOrientation": ["L", "F"]}, {"PatientOrientation": ["A", "F"]}),  # orientation only
    ({"SeriesDescription": "CHEST PA"}, {"SeriesDescription": "Chest Lateral"}),  # description only
    ({"ViewPosition": "", "SeriesDescription": "AP PORTABLE"}, {"ViewPosition": "LATERAL"}),  # empty VP
]


def write_dicom(path, *, study_uid, tags=(), modality="DX", seed=0, side=64):
    """A small 12-bit radiograph (noise) with the given tags; returns its SOPInstanceUID."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    arr = (np.random.default_rng(seed).integers(0, 4096, (side, side))).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = f"P{seed}", "Test^Patient", modality
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    for k, v in dict(tags).items():
        setattr(ds, k, v)
    ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def write_sr(path, study_uid):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = BasicTextSRStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = BasicTextSRStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.Modality, ds.ValueType = study_uid, "SR", "CONTAINER"
    ds.save_as(path, enforce_file_format=True)


def make_archive(root, n=20):
    """n studies (frontal + lateral, VENDOR_TAGS in turn, opaque file names, CR and DX), a stray SR
    in the first study's folder and a corrupt (truncated) file in the last one. Returns {study uid: (frontal sop, lateral sop)}."""
    from pydicom.uid import generate_uid

    studies = {}
    for i in range(n):
        uid = generate_uid()
        front, lat = VENDOR_TAGS[i % len(VENDOR_TAGS)]
        mod = "CR" if i % 2 else "DX"
        # the lateral is written first: order on disk must not decide the view
        s_lat = write_dicom(
            root / f"s{i:02d}" / "IM0001", study_uid=uid, tags=lat, modality=mod, seed=2 * i + 1
        )
        s_front = write_dicom(
            root / f"s{i:02d}" / "IM0002", study_uid=uid, tags=front, modality=mod, seed=2 * i
        )
        studies[uid] = (s_front, s_lat)
    write_sr(root / "s00" / "IM0003", next(iter(studies)))
    last = root / f"s{n - 1:02d}"
    (last / "IM0009").write_bytes((last / "IM0001").read_bytes()[:200])  # cut short
    return studies


def test_dicom_folder_groups_by_study_uid_and_reads_views_from_tags(tmp_path):
    truth = make_archive(tmp_path)
    found = discover(tmp_path)
    assert [s.id for s in found.studies] == sorted(truth)
    for s in found.studies:
        by_view = {im.view: im.sop_instance_uid for im in s.images}
        assert by_view == {"frontal": truth[s.id][0], "lateral": truth[s.id][1]}
        used, rest = select_views(s, ("frontal", "lateral"))
        assert [im.sop_instance_uid for im in used] == list(truth[s.id]) and rest == []
    sources = {im.view_source for s in found.studies for im in s.images}
    assert sources == {"ViewPosition", "PatientOrientation", "SeriesDescription"}
    skipped = {p.path.rsplit("/", 2)[-2] + "/" + p.path.rsplit("/", 1)[-1]: p.reason for p in found.skipped}
    assert set(skipped) == {"s00/IM0003", "s19/IM0009"}
    assert "Basic Text SR Storage" in skipped["s00/IM0003"] and "not an image" in skipped["s00/IM0003"]
    assert "unreadable DICOM" in skipped["s19/IM0009"]


def test_other_modalities_and_duplicates_are_skipped_with_the_reason(tmp_path):
    from pydicom.uid import generate_uid

    uid = generate_uid()
    write_dicom(tmp_path / "a", study_uid=uid, tags={"ViewPosition": "PA"})
    write_dicom(tmp_path / "ct", study_uid=uid, modality="CT")
    (tmp_path / "b").write_bytes((tmp_path / "a").read_bytes())
    (tmp_path / "notes.txt").write_text("hello")
    found = discover(tmp_path)
    assert len(found.studies) == 1 and len(found.studies[0].images) == 1
    reasons = {p.path.rsplit("/", 1)[-1]: p.reason for p in found.skipped}
    assert "same SOPInstanceUID as" in reasons["b"]
    assert "modality CT" in reasons["ct"] and "not a DICOM or image file" in reasons["notes.txt"]


def test_manifest_groups_rows_and_views(tmp_path, iu_images):
    pngs = sorted(iu_images.glob("*.png"))
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "study_id,path,view,language\n"
        f"A,{pngs[0]},LATERAL,zh\nA,{pngs[1]},PA,zh\nB,{pngs[2]},,\nC,missing.png,PA,\n"
    )
    found = discover(manifest)
    assert [(s.id, s.language, [im.view for im in s.images]) for s in found.studies] == [
        ("A", "zh", ["lateral", "frontal"]),
        ("B", None, [None]),
    ]
    assert [(p.study_id, p.reason) for p in found.skipped] == [("C", "file not found")]
    used, _ = select_views(found.studies[0], ("frontal",))
    assert used[0].path == str(pngs[1])
    assert (
        select_views(found.studies[0], ("frontal", "lateral", "lateral"))
        == "no lateral image (has: lateral, frontal)"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("study,file\nA,x.png\n", "missing column(s) path, study_id"),
        ("study_id,path,view\nA,x.png,oblique\n", ":2: view 'oblique' is not one of"),
        ("study_id,path,language\nA,x.png,fr\n", ":2: language 'fr' is not en or zh"),
    ],
)
def test_bad_manifests_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "x.png").write_bytes(b"")
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(UserError, match="m.csv") as e:
        discover(manifest)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_input_kind(tmp_path):
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(UserError, match="corpus .jsonl, a .csv manifest or a folder"):
        discover(tmp_path / "x.txt")
