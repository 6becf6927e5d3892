"""`echocxr generate` end to end: a tiny checkpoint saved by save_pretrained, the four real IU
PNGs (and a DICOM made from one, and non-square crops), a real checkpoint's processor settings,
every decoder, and clear errors for bad inputs."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from echocxr.cli import main
from echocxr.model.config import get_preset
from echocxr.model.image_processing import make_image_processor
from echocxr.model.tokenizer import train_bpe
from echocxr.model.vlm import EchoVLM
from helpers import REPORTS as TEXTS


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


# Qwen2.5-VL-7B-Instruct's own preprocessor_config.json (the layout real checkpoints ship): pixel
# bounds instead of a fixed size, so the processor keeps each image's aspect ratio.
QWEN_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


def _crops(iu_images, tmp_path):
    """A 512x400 crop of a real IU PNG, a portrait and a landscape one, and the square original."""
    src = sorted(iu_images.glob("*.png"))[0]
    boxes = {
        "crop512x400.png": (0, 56, 512, 456),
        "portrait.png": (106, 0, 406, 512),
        "landscape.png": (0, 156, 512, 356),
    }
    files = []
    for name, box in boxes.items():
        Image.open(src).crop(box).save(tmp_path / name)
        files.append(tmp_path / name)
    assert Image.open(files[0]).size == (512, 400)
    return [*files, src]


@pytest.mark.parametrize("layout", ["echocxr", "real"])
def test_non_square_images_with_either_processor_layout(ckpt, iu_images, tmp_path, capsys, layout):
    files = _crops(iu_images, tmp_path)
    if layout == "real":  # a real checkpoint's own processor settings
        real = tmp_path / "real_ckpt"
        shutil.copytree(ckpt, real)
        (real / "preprocessor_config.json").write_text(json.dumps(QWEN_PREPROCESSOR))
        ckpt = real
    rc, out, err = _run(
        capsys, "--ckpt", ckpt, *files, "--max-new-tokens", 4, "--decoder", "ar", "--batch-size", 2
    )
    assert rc == 0, err
    rows = json.loads(out)
    assert [r["file"] for r in rows] == [str(f) for f in files] and all(1 <= r["tokens"] <= 4 for r in rows)


def test_processor_that_disagrees_with_the_model_is_one_line_error(ckpt, iu_images, tmp_path, capsys):
    bad = tmp_path / "bad_ckpt"
    shutil.copytree(ckpt, bad)
    # max_pixels below the model's 56x56 input: the processor would shrink it to one token, not four.
    (bad / "preprocessor_config.json").write_text(json.dumps({**QWEN_PREPROCESSOR, "max_pixels": 784}))
    png = sorted(iu_images.glob("*.png"))[0]
    rc, _, err = _run(capsys, "--ckpt", bad, png, "--max-new-tokens", 2)
    assert rc == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [
        f"echocxr: error: {bad / 'preprocessor_config.json'}: min/max pixels 3136/784 turn the model's 56x56 "
        "input into 1 image tokens, but the model was trained with 4; they must admit 3136 pixels"
    ]


def test_tiny_and_extreme_images_are_one_line_errors(ckpt, tmp_path, capsys):
    for name, size in {"tiny.png": (20, 10), "extreme.png": (3000, 10)}.items():
        Image.new("L", size, 128).save(tmp_path / name)
        rc, _, err = _run(capsys, "--ckpt", ckpt, tmp_path / name, "--max-new-tokens", 2)
        assert rc == 2 and "Traceback" not in err
        assert err.strip().splitlines() == [
            f"echocxr: error: {tmp_path / name}: " + err.split(": ", 3)[-1].strip()
        ]
        assert f"{size[0]}x{size[1]} px" in err


def test_generate_pipeline_and_datasets_share_prepare_image(ckpt, iu_images, tmp_path, capsys, monkeypatch):
    """One preprocessing path: every entry point calls `prepare_image` (a spy around the real one)
    with the model's input side, for a non-square real radiograph."""
    import echocxr.data.images as images_mod
    from echocxr import pipeline
    from echocxr.data.records import ImageRef, Record

    calls = []
    real_prepare = images_mod.prepare_image

    def spy(img, size):
        calls.append((img.size, size))
        return real_prepare(img, size)

    monkeypatch.setattr(images_mod, "prepare_image", spy)
    crop = _crops(iu_images, tmp_path)[0]  # 512x400
    rc, _, err = _run(capsys, "--ckpt", ckpt, crop, "--max-new-tokens", 2, "--decoder", "ar")
    assert rc == 0, err
    assert calls == [((512, 400), 56)]  # generate: the tiny preset's 56 px input
    folder = tmp_path / "study"
    folder.mkdir()
    shutil.copy(crop, folder / "CXR1_IM-0001-1001.png")
    pipeline.real_image_reports({"ar": ckpt}, folder, tmp_path / "none.jsonl", tmp_path / "out", "cpu")
    assert calls[1:] == [((512, 400), 56)]  # the pipeline's real-image reports: the same step
    assert json.loads((tmp_path / "out" / "reports.json").read_text())[0]["study"] == "CXR1"
    rec = Record("iu:T1", "iu:T1", "iu", images=[ImageRef(str(crop), "frontal")])
    images_mod.study_images(rec, size=112, seed=0, source="real")  # training and evaluation
    assert calls[2:] == [((512, 400), 112)]


def test_images_or_studies_one_line_errors(ckpt, iu_images, tmp_path, capsys):
    png = sorted(iu_images.glob("*.png"))[0]
    for argv, says in [
        (["--ckpt", ckpt], "give image paths, or --studies"),
        (["--ckpt", ckpt, png, "--studies", tmp_path, "--out", tmp_path / "o"], "not both"),
        (["--ckpt", ckpt, png, "--sr-out", tmp_path / "sr"], "go with --studies"),
        (["--ckpt", ckpt, "--studies", tmp_path], "--studies needs --out DIR"),
        (
            ["--ckpt", ckpt, "--studies", tmp_path / "nope.csv", "--out", tmp_path / "o"],
            "nope.csv: --studies not found",
        ),
    ]:
        rc, _, err = _run(capsys, *argv)
        assert rc == 2 and says in err and "Traceback" not in err, err
