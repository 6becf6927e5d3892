"""`echocxr generate` end to end: a tiny checkpoint saved by save_pretrained, the four real IU
PNGs (and a DICOM made from one), every decoder, and clear errors for bad inputs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from echocxr.cli import main
from echocxr.model.config import get_preset
from echocxr.model.image_processing import make_image_processor
from echocxr.model.tokenizer import train_bpe
from echocxr.model.vlm import EchoVLM

TEXTS = [
    "Findings: The heart is normal in size. No pleural effusion. No pneumothorax.\nImpression: Normal chest.",
    "Findings: Mild cardiomegaly. Small left pleural effusion.\nImpression: Cardiomegaly with effusion.",
    "所见：心影大小正常。无胸腔积液。无气胸。\n印象：胸部未见异常。",
] * 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.set_num_threads(1)
    tok = train_bpe(TEXTS, 400)
    cfg = get_preset("tiny")
    model = EchoVLM.from_config(cfg, tok, seed=0).eval()
    out = tmp_path_factory.mktemp("ckpt") / "dcd"
    model.save_pretrained(
        out, tok, make_image_processor(cfg.image_size), extra={"stage": "dcd", "block_size": 4}
    )
    return out


def _run(capsys, *argv):
    rc = main(["generate", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_reports_for_the_real_pngs(ckpt, iu_images, tmp_path, capsys):
    pngs = sorted(iu_images.glob("*.png"))
    assert len(pngs) == 4
    out = tmp_path / "reports.json"
    rc, _, err = _run(capsys, "--ckpt", ckpt, *pngs, "--max-new-tokens", 12, "--json", out, "--decoder", "ar")
    assert rc == 0, err
    rows = json.loads(out.read_text())
    assert [r["file"] for r in rows] == [str(p) for p in pngs]
    for r in rows:
        assert set(r) >= {"file", "findings", "impression", "decoder", "tokens", "seconds"}
        assert r["decoder"] == "ar" and 1 <= r["tokens"] <= 12 and r["seconds"] > 0
        assert r["findings"] or r["impression"] or r["report"] == ""


def test_decoder_defaults_to_the_checkpoint_stage_and_batches_agree(ckpt, iu_images, capsys):
    pngs = sorted(iu_images.glob("*.png"))[:2]
    common = ["--ckpt", ckpt, *pngs, "--max-new-tokens", 8]
    rc, one, err = _run(capsys, *common)
    assert rc == 0, err
    rows = json.loads(one)
    assert {r["decoder"] for r in rows} == {"onestep"}  # stage "dcd" in echocxr.json
    rc, two, err = _run(capsys, *common, "--batch-size", 2)
    assert rc == 0, err
    assert [r["report"] for r in json.loads(two)] == [r["report"] for r in rows]
    rc, unfused, _ = _run(capsys, *common, "--no-fuse", "--language", "zh")
    assert rc == 0 and {r["decoder"] for r in json.loads(unfused)} == {"onestep-unfused"}
    rc, block, _ = _run(capsys, *common, "--decoder", "block", "--steps", 2)
    assert rc == 0 and {r["decoder"] for r in json.loads(block)} == {"block"}


def _write_dicom(png, path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    arr = np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 16  # 12-bit detector range
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation = "DX", "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).pixel_array.shape == arr.shape
    return arr


def test_dicom_input(ckpt, iu_images, tmp_path, capsys):
    path = tmp_path / "study.dcm"
    _write_dicom(sorted(iu_images.glob("*.png"))[0], path)
    rc, out, err = _run(capsys, "--ckpt", ckpt, path, "--max-new-tokens", 4, "--decoder", "ar")
    assert rc == 0, err
    assert json.loads(out)[0]["file"] == str(path)


def test_plain_loader_used_without_the_data_package(iu_images, tmp_path):
    """The fallback reader (when echocxr.data.images is absent): PNG, DICOM, clear errors."""
    from echocxr.decode.cli import _load_image_plain
    from echocxr.errors import UserError

    png = sorted(iu_images.glob("*.png"))[0]
    ref = np.asarray(Image.open(png).convert("L"))
    assert np.array_equal(np.asarray(_load_image_plain(png)), ref)
    dcm = tmp_path / "study.dcm"
    _write_dicom(png, dcm)
    img = np.asarray(_load_image_plain(dcm), dtype=float)
    assert img.shape == ref.shape and np.corrcoef(img.ravel(), ref.ravel())[0, 1] > 0.99
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    with pytest.raises(UserError, match="bad.dcm"):
        _load_image_plain(bad)
    with pytest.raises(UserError, match="nope.png"):
        _load_image_plain(tmp_path / "nope.png")


def test_bad_inputs_are_one_line_errors(ckpt, iu_images, tmp_path, capsys):
    png = sorted(iu_images.glob("*.png"))[0]
    rc, _, err = _run(capsys, "--ckpt", ckpt, tmp_path / "missing.png")
    assert rc == 2 and "missing.png" in err and "Traceback" not in err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rc, _, err = _run(capsys, "--ckpt", ckpt, png, broken)
    assert rc == 2 and "broken.png" in err
    rc, _, err = _run(capsys, "--ckpt", tmp_path, png)
    assert rc == 2 and str(tmp_path) in err and "config.json" in err
    rc, _, err = _run(capsys, "--ckpt", ckpt, png, "--decoder", "block", "--block-size", 4, "--steps", 9)
    assert rc == 2 and "steps" in err
