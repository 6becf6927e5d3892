"""Image loading (PNG modes, JPEG with EXIF, DICOM, corrupt and degenerate files, bytes), the one
preprocessing step `prepare_image`, and `study_images` (real files vs phantoms)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from echocxr.data.images import (
    MAX_ASPECT,
    MIN_SIDE,
    load_image,
    load_image_bytes,
    prepare_image,
    study_images,
)
from echocxr.data.records import ImageRef, Record
from echocxr.errors import UserError


def test_real_radiographs_load(iu_images):
    files = sorted(iu_images.glob("*.png"))
    assert len(files) == 4
    for p in files:
        img = load_image(p)
        assert img.mode == "L" and min(img.size) > 100
        assert np.asarray(img).std() > 10


def test_jpeg_and_16bit_png(tmp_path):
    arr = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    Image.fromarray(arr).convert("RGB").save(tmp_path / "a.jpg")
    assert load_image(tmp_path / "a.jpg").mode == "L"
    wide = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "b.png")
    out = np.asarray(load_image(tmp_path / "b.png"))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255


def test_png_modes_16bit_rgba_palette(tmp_path):
    base = np.tile(np.arange(0, 240, 4, dtype=np.uint8), (40, 1))  # [40, 60] ramp
    gray = Image.fromarray(base)
    # 16-bit: scaled from its own min/max to 0..255, same picture as the 8-bit ramp.
    Image.fromarray(base.astype(np.uint16) * 257).save(tmp_path / "w16.png")
    w16 = np.asarray(load_image(tmp_path / "w16.png"), dtype=int)
    assert np.abs(w16 - np.round(base * 255.0 / base.max())).max() <= 1
    # RGBA: opaque pixels as their gray value; transparent ones black (the padding's colour), even
    # when their RGB is white.
    rgba = np.dstack([base, base, base, np.full_like(base, 255)])
    rgba[:, :10] = (255, 255, 255, 0)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = np.asarray(load_image(tmp_path / "rgba.png"), dtype=int)
    assert (out[:, :10] == 0).all() and np.array_equal(out[:, 10:], base[:, 10:])
    # Palette (with and without a transparent entry): the palette's colours, not its indices.
    pal = gray.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.save(tmp_path / "p.png")
    assert np.abs(np.asarray(load_image(tmp_path / "p.png"), dtype=int) - base).max() <= 8
    idx = np.asarray(pal)[0, 0]
    pal.save(tmp_path / "pt.png", transparency=int(idx))
    pt = np.asarray(load_image(tmp_path / "pt.png"), dtype=int)
    assert (pt[np.asarray(pal) == idx] == 0).all()
    assert all(load_image(tmp_path / f).mode == "L" for f in ("w16.png", "rgba.png", "p.png", "pt.png"))


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((40, 80), np.uint8)  # stored 80 wide, 40 high; bright block on the left
    arr[:, :20] = 250
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: rotate 90 degrees clockwise to display
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    img = load_image(tmp_path / "rot.jpg")
    assert img.size == (40, 80)
    px = np.asarray(img, dtype=int)
    assert px[:20].mean() > 200 and px[-40:].mean() < 30  # the left edge is now the top
    same = load_image_bytes((tmp_path / "rot.jpg").read_bytes(), "upload.jpg")
    assert np.array_equal(np.asarray(same), np.asarray(img))


def test_tiny_and_extreme_images_are_refused_by_name(tmp_path):
    for name, (w, h) in {"tiny.png": (20, 10), "strip.png": (3000, 10), "long.png": (600, 40)}.items():
        Image.new("L", (w, h), 128).save(tmp_path / name)
        with pytest.raises(UserError, match=name) as e:
            load_image(tmp_path / name)
        assert "\n" not in str(e.value) and f"{w}x{h}" in str(e.value)
    # The limits themselves are accepted.
    Image.new("L", (MIN_SIDE, MIN_SIDE), 128).save(tmp_path / "small.png")
    Image.new("L", (int(MIN_SIDE * MAX_ASPECT), MIN_SIDE), 128).save(tmp_path / "wide.png")
    assert load_image(tmp_path / "small.png").size == (MIN_SIDE, MIN_SIDE)
    assert load_image(tmp_path / "wide.png").size == (int(MIN_SIDE * MAX_ASPECT), MIN_SIDE)


def test_load_image_bytes_matches_load_image(iu_images, tmp_path):
    png = sorted(iu_images.glob("*.png"))[0]
    assert np.array_equal(
        np.asarray(load_image_bytes(png.read_bytes(), "a.png")), np.asarray(load_image(png))
    )
    ramp = np.tile(np.linspace(0, 4000, 80), (60, 1))
    _write_dicom(tmp_path / "m.dcm", ramp, "MONOCHROME2")
    data = (tmp_path / "m.dcm").read_bytes()
    ref = np.asarray(load_image(tmp_path / "m.dcm"))
    assert np.array_equal(np.asarray(load_image_bytes(data, "m.dcm")), ref)
    assert np.array_equal(np.asarray(load_image_bytes(data, "upload")), ref)  # found by its preamble
    for data, name in [(b"", "empty.png"), (b"junk", "junk.png"), (b"\0" * 128 + b"DICMjunk", "x.bin")]:
        with pytest.raises(UserError, match=name):
            load_image_bytes(data, name)


def test_prepare_image_pads_to_a_square_keeping_the_aspect_ratio(iu_images):
    src = load_image(sorted(iu_images.glob("*.png"))[0])
    crop = src.crop((0, 56, 512, 456))  # 512 wide, 400 high
    out = prepare_image(crop, 128)
    assert out.mode == "L" and out.size == (128, 128)
    px = np.asarray(out, dtype=int)
    # 400/512 * 128 = 100 rows of image, 14 black rows above and below.
    assert (px[:14] == 0).all() and (px[-14:] == 0).all() and px[14:114].std() > 10
    ref = np.asarray(crop.resize((128, 100), Image.BILINEAR), dtype=int)
    assert np.array_equal(px[14:114], ref)
    portrait = np.asarray(prepare_image(crop.transpose(Image.Transpose.TRANSPOSE), 128), dtype=int)
    # Portrait pads left and right the same way (resampling order may move a value by 1).
    assert (portrait[:, :14] == 0).all() and np.abs(portrait - px.T).max() <= 1
    square = prepare_image(src, 512)
    assert np.array_equal(np.asarray(square), np.asarray(src))  # already the size: unchanged
    rgb = prepare_image(crop.convert("RGB"), 128)
    assert np.array_equal(np.asarray(rgb), px)
    with pytest.raises(ValueError):
        prepare_image(src, 0)


def _write_dicom(path, pixels: np.ndarray, photometric: str, window=None):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_monochrome1_is_inverted_and_windowed(tmp_path):
    # A gradient: low stored values on the left. MONOCHROME2 shows them dark, MONOCHROME1 bright.
    ramp = np.tile(np.linspace(0, 4000, 80), (60, 1))
    _write_dicom(tmp_path / "m2.dcm", ramp, "MONOCHROME2")
    _write_dicom(tmp_path / "m1.dcm", ramp, "MONOCHROME1")
    m2 = np.asarray(load_image(tmp_path / "m2.dcm"), dtype=int)
    m1 = np.asarray(load_image(tmp_path / "m1.dcm"), dtype=int)
    assert m2[:, :5].mean() < 20 and m2[:, -5:].mean() > 235
    assert m1[:, :5].mean() > 235 and m1[:, -5:].mean() < 20
    # A stated window (centre 2000, width 1000) saturates values outside [1500, 2500].
    _write_dicom(tmp_path / "w.dcm", ramp, "MONOCHROME2", window=(2000, 1000))
    w = np.asarray(load_image(tmp_path / "w.dcm"), dtype=int)
    assert (w == 0).mean() > 0.3 and (w == 255).mean() > 0.3
    mid = np.argmin(np.abs(ramp[0] - 2000))  # the window's centre maps to mid grey
    assert abs(w[0, mid] - 128) < 8
    # A DICOM without the .dcm suffix is recognised by its preamble.
    (tmp_path / "m2.dcm").rename(tmp_path / "noext")
    assert np.array_equal(np.asarray(load_image(tmp_path / "noext"), dtype=int), m2)


def test_bad_files_raise_user_error_naming_the_file(tmp_path):
    with pytest.raises(UserError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(UserError, match="junk.png"):
        load_image(tmp_path / "junk.png")
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    with pytest.raises(UserError, match="bad.dcm"):
        load_image(tmp_path / "bad.dcm")


def _record(images=(), **kw) -> Record:
    return Record("iu:T1", "iu:T1", "iu", images=list(images), mesh=["Cardiomegaly/severe"], **kw)


def test_study_images_real_phantom_and_auto(iu_images):
    front, lat = iu_images / "CXR7_IM-2263-1001.png", iu_images / "CXR7_IM-2263-2001.png"
    rec = _record([ImageRef(str(front), "frontal"), ImageRef(str(lat), "lateral")])
    real = study_images(rec, size=128, seed=0, views=("frontal", "lateral"))
    assert [im.size for im in real] == [(128, 128)] * 2
    # Real files go through the one preprocessing step.
    assert np.array_equal(np.asarray(real[0]), np.asarray(prepare_image(load_image(front), 128)))
    ph = study_images(rec, size=128, seed=0, source="phantom")
    assert not np.array_equal(np.asarray(ph[0]), np.asarray(real[0]))
    # Relative paths resolve against root; missing files fall back to phantoms under "auto".
    rel = _record([ImageRef(front.name, "PA")])
    assert np.array_equal(
        np.asarray(study_images(rel, size=128, seed=0, root=iu_images)[0]), np.asarray(real[0])
    )
    gone = _record([ImageRef("nowhere/x.png", "PA")])
    auto = study_images(gone, size=128, seed=0)
    assert np.array_equal(np.asarray(auto[0]), np.asarray(ph[0]))
    with pytest.raises(UserError, match="iu:T1"):
        study_images(gone, size=128, seed=0, source="real")


def test_study_images_determinism_and_epochs():
    rec = _record()
    a = np.asarray(study_images(rec, size=112, seed=3)[0])
    assert np.array_equal(a, np.asarray(study_images(rec, size=112, seed=3, epoch=None)[0]))
    e0 = np.asarray(study_images(rec, size=112, seed=3, epoch=0)[0])
    e1 = np.asarray(study_images(rec, size=112, seed=3, epoch=1)[0])
    assert not np.array_equal(e0, e1) and not np.array_equal(a, e0)
    assert np.array_equal(e1, np.asarray(study_images(rec, size=112, seed=3, epoch=1)[0]))
    assert not np.array_equal(a, np.asarray(study_images(rec, size=112, seed=4)[0]))
    both = study_images(rec, size=112, seed=3, views=("frontal", "lateral"))
    assert len(both) == 2 and not np.array_equal(np.asarray(both[0]), np.asarray(both[1]))
    with pytest.raises(ValueError):
        study_images(rec, size=112, seed=0, source="camera")
