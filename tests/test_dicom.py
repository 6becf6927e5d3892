"""DICOM reading: window and rescale values checked (percentile fallback, one warning), compressed
transfer syntaxes (JPEG Lossless, JPEG 2000) decoded by the pylibjpeg plugins, multi-frame files."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from echocxr.data.images import ImageWarning, load_image

pydicom = pytest.importorskip("pydicom")

# Stored values 0..4000 (12 bits) in a smooth ramp with some texture, so a window is visible.
H, W = 48, 64
RAMP = (np.tile(np.linspace(0, 4000, W), (H, 1)) + 40 * np.sin(np.arange(H))[:, None]).clip(0, 4095)
RAMP = RAMP.astype(np.uint16)
# Same-length DS placeholders: real values are patched into the written file's bytes afterwards,
# since pydicom (rightly) refuses to write "abc" or "nan" into a DS element itself.
_PLACEHOLDER = {
    kw: str(i + 1) * 16
    for i, kw in enumerate(("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"))
}


def write_dicom(path, pixels: np.ndarray, *, tags: dict | None = None, raw: dict | None = None) -> None:
    """An uncompressed DX file of `pixels` ([H, W] or [frames, H, W], uint16, 12 bits stored).
    tags: keyword -> value set through pydicom; raw: keyword -> DS text written verbatim."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation = "DX", "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    for k, v in (tags or {}).items():
        setattr(ds, k, v)
    for k in raw or {}:
        setattr(ds, k, _PLACEHOLDER[k])
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    if raw:
        data = path.read_bytes()
        for k, v in raw.items():
            assert len(v) <= 16 and data.count(_PLACEHOLDER[k].encode()) == 1
            data = data.replace(_PLACEHOLDER[k].encode(), v.encode().ljust(16))
        path.write_bytes(data)


def _load(path) -> tuple[np.ndarray, list[str]]:
    """(pixels, messages of the ImageWarnings raised while loading)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = np.asarray(load_image(path), dtype=int)
    return img, [str(w.message) for w in caught if issubclass(w.category, ImageWarning)]


@pytest.fixture(scope="module")
def percentile_reference(tmp_path_factory):
    """The file without any window: the documented percentile window, no warning."""
    path = tmp_path_factory.mktemp("dcm") / "plain.dcm"
    write_dicom(path, RAMP)
    img, warned = _load(path)
    assert warned == [] and img.std() > 50  # a visible ramp, not a black or flat image
    assert img.min() == 0 and img.max() == 255
    return img


@pytest.mark.parametrize(
    "raw, tags",
    [
        ({"WindowCenter": "", "WindowWidth": ""}, {}),  # empty: used to raise TypeError
        ({"WindowCenter": "nan", "WindowWidth": "1000"}, {}),  # NaN: used to give an all-black image
        ({"WindowCenter": "2000", "WindowWidth": "inf"}, {}),
        ({"WindowCenter": "-inf", "WindowWidth": "1000"}, {}),
        ({"WindowCenter": "abc", "WindowWidth": "1000"}, {}),  # non-numeric: used to raise ValueError
        ({"WindowCenter": "2000", "WindowWidth": "0"}, {}),  # width below 1 (PS3.3 C.11.2.1.2.1)
        ({"WindowCenter": "2000"}, {}),  # a centre without a width
        ({"RescaleSlope": "", "RescaleIntercept": "0"}, {"WindowCenter": 2000, "WindowWidth": 1000}),
        ({"RescaleSlope": "nan", "RescaleIntercept": "0"}, {"WindowCenter": 2000, "WindowWidth": 1000}),
        ({"RescaleSlope": "1", "RescaleIntercept": "x"}, {"WindowCenter": 2000, "WindowWidth": 1000}),
        ({"RescaleSlope": "1", "RescaleIntercept": "inf"}, {}),
    ],
)
def test_bad_window_or_rescale_falls_back_to_the_percentile_window(tmp_path, percentile_reference, raw, tags):
    path = tmp_path / "bad.dcm"
    write_dicom(path, RAMP, tags=tags, raw=raw)
    img, warned = _load(path)
    assert len(warned) == 1 and "bad.dcm" in warned[0] and "percentile" in warned[0]
    assert np.array_equal(img, percentile_reference)


def test_valid_window_rescale_and_multi_valued_window(tmp_path, percentile_reference):
    write_dicom(tmp_path / "w.dcm", RAMP, tags={"WindowCenter": 2000, "WindowWidth": 1000})
    windowed, warned = _load(tmp_path / "w.dcm")
    assert warned == [] and not np.array_equal(windowed, percentile_reference)
    assert (windowed == 0).mean() > 0.3 and (windowed == 255).mean() > 0.3
    # Several windows listed: the first is used (PS3.3 C.11.2.1.2: the first is the default).
    write_dicom(tmp_path / "m.dcm", RAMP, tags={"WindowCenter": [2000, 100], "WindowWidth": [1000, 50]})
    assert np.array_equal(_load(tmp_path / "m.dcm")[0], windowed)
    # A multi-valued raw string keeps its first, valid value too.
    write_dicom(tmp_path / "r.dcm", RAMP, raw={"WindowCenter": "2000\\x", "WindowWidth": "1000\\1"})
    first, warned = _load(tmp_path / "r.dcm")
    assert warned == [] and np.array_equal(first, windowed)
    # Rescale applies before the window: slope 2, intercept -1000 moves the centre to 3000, width 2000.
    write_dicom(
        tmp_path / "s.dcm",
        RAMP,
        tags={"RescaleSlope": 2, "RescaleIntercept": -1000, "WindowCenter": 3000, "WindowWidth": 2000},
    )
    rescaled, warned = _load(tmp_path / "s.dcm")
    assert warned == [] and np.abs(rescaled - windowed).max() <= 1


def test_multi_frame_reads_the_first_frame_with_a_warning(tmp_path):
    frames = np.stack([RAMP, RAMP[:, ::-1], np.full_like(RAMP, 100)])
    write_dicom(tmp_path / "multi.dcm", frames)
    write_dicom(tmp_path / "first.dcm", frames[0])
    img, warned = _load(tmp_path / "multi.dcm")
    assert len(warned) == 1 and "multi.dcm" in warned[0] and "3 frames" in warned[0]
    assert np.array_equal(img, _load(tmp_path / "first.dcm")[0])


# ---------------------------------------------------------------------------------------------
# Compressed transfer syntaxes


def _jpeg_lossless_sv1(pixels: np.ndarray, precision: int) -> bytes:
    """A minimal JPEG Lossless (ITU T.81 process 14, first-order prediction SV1, Pt=0) codestream for
    one grayscale frame: the DICOM transfer syntax 1.2.840.10008.1.2.4.70. No encoder for it ships
    with pydicom or the plugins, so the test writes one (T.81 H.1 and Annex F Huffman coding)."""
    h, w = pixels.shape
    px = pixels.astype(np.int64)
    # Predictions (T.81 H.1.2.1): 2^(P-1) for the first sample, the left neighbour on the first row,
    # the upper neighbour in the first column, the left neighbour (SV1) elsewhere.
    pred = np.empty_like(px)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = px[0, :-1]
    pred[1:, 0] = px[:-1, 0]
    pred[1:, 1:] = px[1:, :-1]
    diffs = (px - pred).ravel()
    # One Huffman table: categories 0..16, all 5-bit codes (canonical codes 0..16; none all ones).
    bits, n = 0, 0
    out = bytearray()

    def put(value: int, length: int) -> None:
        nonlocal bits, n
        bits, n = (bits << length) | (value & ((1 << length) - 1)), n + length
        while n >= 8:
            byte = (bits >> (n - 8)) & 0xFF
            out.append(byte)
            if byte == 0xFF:
                out.append(0x00)  # byte stuffing (T.81 F.1.2.3)
            n -= 8
            bits &= (1 << n) - 1

    for d in diffs.tolist():
        ssss = int(abs(d)).bit_length()
        put(ssss, 5)
        if ssss:
            put(d if d >= 0 else d - 1, ssss)
    if n:
        put((1 << (8 - n)) - 1, 8 - n)  # pad with 1-bits
    counts = [0] * 16
    counts[4] = 17
    sof = (
        bytes([0xFF, 0xC3, 0, 11, precision])
        + h.to_bytes(2, "big")
        + w.to_bytes(2, "big")
        + bytes([1, 1, 0x11, 0])
    )
    dht = bytes([0xFF, 0xC4, 0, 2 + 1 + 16 + 17, 0x00, *counts, *range(17)])
    sos = bytes([0xFF, 0xDA, 0, 8, 1, 1, 0x00, 1, 0, 0])
    return b"\xff\xd8" + sof + dht + sos + bytes(out) + b"\xff\xd9"


def test_jpeg_lossless_dicom_reads_exactly(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    write_dicom(tmp_path / "plain.dcm", RAMP)
    ds = pydicom.dcmread(tmp_path / "plain.dcm")
    ds.PixelData = encapsulate([_jpeg_lossless_sv1(RAMP, 12)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.save_as(tmp_path / "jpegll.dcm", enforce_file_format=True)
    assert np.array_equal(pydicom.dcmread(tmp_path / "jpegll.dcm").pixel_array, RAMP)  # lossless: exact
    assert np.array_equal(_load(tmp_path / "jpegll.dcm")[0], _load(tmp_path / "plain.dcm")[0])


def test_jpeg2000_dicom_reads_exactly(tmp_path):
    from pydicom.uid import JPEG2000Lossless

    write_dicom(tmp_path / "plain.dcm", RAMP)
    ds = pydicom.dcmread(tmp_path / "plain.dcm")
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    back = pydicom.dcmread(tmp_path / "j2k.dcm")
    assert back.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert np.array_equal(back.pixel_array, RAMP)
    assert np.array_equal(_load(tmp_path / "j2k.dcm")[0], _load(tmp_path / "plain.dcm")[0])


# ---------------------------------------------------------------------------------------------
# The display pipeline (issue 22, items 9-13): padding, VOI LUT and VOILUTFunction, Presentation
# LUT Shape, a missing PhotometricInterpretation, every failure as one line.


def _padded(border_value=4095, width_frac=0.15) -> np.ndarray:
    """RAMP inside a border of `border_value` (a scalar or an array giving each border pixel) about
    `width_frac` of each side wide: what a detector writes outside the collimated field."""
    b = max(1, round(width_frac * W))
    out = np.empty((H + 2 * b, W + 2 * b), dtype=np.int64)
    out[...] = border_value if np.isscalar(border_value) else border_value[: out.shape[0], : out.shape[1]]
    out[b : b + H, b : b + W] = RAMP
    return out, b


@pytest.mark.parametrize(
    "tags",
    [
        {},  # the percentile window: padding takes no part in the statistics
        {"WindowCenter": 2000, "WindowWidth": 3000},
        {"PhotometricInterpretation": "MONOCHROME1"},  # border stays black after the inversion
        {"PresentationLUTShape": "INVERSE"},
    ],
)
def test_pixel_padding_is_excluded_and_black(tmp_path, tags):
    padded, b = _padded()
    write_dicom(tmp_path / "pad.dcm", padded, tags={"PixelPaddingValue": 4095, **tags})
    write_dicom(tmp_path / "crop.dcm", RAMP, tags=tags)
    img, warned = _load(tmp_path / "pad.dcm")
    twin = _load(tmp_path / "crop.dcm")[0]
    assert warned == []
    assert np.array_equal(img[b : b + H, b : b + W], twin)  # the anatomy as if cropped
    border = np.ones(img.shape, bool)
    border[b : b + H, b : b + W] = False
    assert (img[border] == 0).all()


def test_pixel_padding_range_limit(tmp_path):
    rng = np.random.default_rng(0)
    padded, b = _padded(rng.integers(4090, 4096, (200, 200)))
    write_dicom(
        tmp_path / "pad.dcm", padded, tags={"PixelPaddingValue": 4095, "PixelPaddingRangeLimit": 4090}
    )
    write_dicom(tmp_path / "crop.dcm", RAMP)
    img = _load(tmp_path / "pad.dcm")[0]
    assert np.array_equal(img[b : b + H, b : b + W], _load(tmp_path / "crop.dcm")[0])
    assert img[:b].max() == 0 and img[-b:].max() == 0


def _voi_lut_item(lut: np.ndarray, bits: int, first: int = 0):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.add_new(0x00283002, "US", [len(lut) if len(lut) < 65536 else 0, first, bits])  # LUTDescriptor
    item.add_new(0x00283006, "US", [int(v) for v in lut])  # LUTData
    return item


def test_voi_lut_sequence_scaled_by_its_output_range(tmp_path):
    from pydicom.pixels import apply_voi_lut

    # A gamma curve whose output spans only 600..3400 of its 12 bits: the LUT's range, not the
    # image's own min..max, maps to black..white (before: stretched, 26.6 grey levels off).
    x = np.arange(4096)
    lut = (600 + 2800 * (x / 4095) ** 0.7).round().astype(int)
    write_dicom(tmp_path / "lut.dcm", RAMP, tags={"VOILUTSequence": [_voi_lut_item(lut, 12)]})
    img, warned = _load(tmp_path / "lut.dcm")
    ds = pydicom.dcmread(tmp_path / "lut.dcm")
    reference = apply_voi_lut(ds.pixel_array, ds).astype(float) * 255 / 4095
    assert warned == [] and np.abs(img - reference).max() <= 1
    assert img.min() >= 600 * 255 / 4095 - 1 and img.max() <= 3400 * 255 / 4095 + 1


def _standard_window(x, c, w, function):
    """PS3.3 C.11.2.1.2.1 / C.11.2.1.3.1 / C.11.2.1.3.2 written out, ymin 0 and ymax 255."""
    x = x.astype(float)
    if function == "LINEAR":
        y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
        return np.where(x <= c - 0.5 - (w - 1) / 2, 0, np.where(x > c - 0.5 + (w - 1) / 2, 255, y))
    if function == "LINEAR_EXACT":
        y = ((x - c) / w + 0.5) * 255
        return np.where(x <= c - w / 2, 0, np.where(x > c + w / 2, 255, y))
    return 255 / (1 + np.exp(-4 * (x - c) / w))


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize(("c", "w"), [(2000, 1000), (1500.5, 40), (3000, 4000)])
def test_voi_lut_function_follows_the_standard(tmp_path, function, c, w):
    tags = {"WindowCenter": c, "WindowWidth": w}
    if function != "LINEAR":
        tags["VOILUTFunction"] = function
    write_dicom(tmp_path / "f.dcm", RAMP, tags=tags)
    img, warned = _load(tmp_path / "f.dcm")
    assert warned == []
    assert np.abs(img - _standard_window(RAMP, c, w, function)).max() <= 0.5 + 1e-9


def test_sigmoid_differs_from_linear(tmp_path):
    write_dicom(tmp_path / "lin.dcm", RAMP, tags={"WindowCenter": 2000, "WindowWidth": 1000})
    write_dicom(
        tmp_path / "sig.dcm",
        RAMP,
        tags={"WindowCenter": 2000, "WindowWidth": 1000, "VOILUTFunction": "SIGMOID"},
    )
    assert np.abs(_load(tmp_path / "lin.dcm")[0] - _load(tmp_path / "sig.dcm")[0]).max() > 20


def test_presentation_lut_shape_inverse(tmp_path):
    write_dicom(tmp_path / "m2.dcm", RAMP)
    write_dicom(tmp_path / "m2inv.dcm", RAMP, tags={"PresentationLUTShape": "INVERSE"})
    write_dicom(tmp_path / "m2id.dcm", RAMP, tags={"PresentationLUTShape": "IDENTITY"})
    write_dicom(tmp_path / "m1.dcm", RAMP, tags={"PhotometricInterpretation": "MONOCHROME1"})
    write_dicom(
        tmp_path / "m1inv.dcm",
        RAMP,
        tags={"PhotometricInterpretation": "MONOCHROME1", "PresentationLUTShape": "INVERSE"},
    )
    m2 = _load(tmp_path / "m2.dcm")[0]
    assert np.array_equal(_load(tmp_path / "m2inv.dcm")[0], 255 - m2)  # MONOCHROME2 + INVERSE: inverted
    assert np.array_equal(_load(tmp_path / "m2id.dcm")[0], m2)
    # Policy: MONOCHROME1 + INVERSE is the DX IOD's own pairing (PS3.3 C.8.11.2): one inversion.
    assert np.array_equal(_load(tmp_path / "m1.dcm")[0], 255 - m2)
    assert np.array_equal(_load(tmp_path / "m1inv.dcm")[0], 255 - m2)


def test_missing_photometric_interpretation_reads_as_monochrome2(tmp_path):
    write_dicom(tmp_path / "m2.dcm", RAMP)
    ds = pydicom.dcmread(tmp_path / "m2.dcm")
    del ds.PhotometricInterpretation
    ds.save_as(tmp_path / "nopi.dcm")
    img, warned = _load(tmp_path / "nopi.dcm")
    assert len(warned) == 1 and "nopi.dcm" in warned[0] and "MONOCHROME2" in warned[0]
    assert np.array_equal(img, _load(tmp_path / "m2.dcm")[0])


def test_malformed_voi_lut_is_one_line_naming_the_file(tmp_path):
    from echocxr.data.images import load_image_bytes
    from echocxr.errors import UserError
    from echocxr.serve.images import decode_upload

    lut = _voi_lut_item(np.arange(4096), 12)
    lut.LUTDescriptor = [4096, 0]  # two values: malformed (PS3.3 C.11.2.1.1 needs three)
    write_dicom(tmp_path / "badlut.dcm", RAMP, tags={"VOILUTSequence": [lut]})
    with pytest.raises(UserError, match="badlut.dcm") as e:
        load_image(tmp_path / "badlut.dcm")
    assert "\n" not in str(e.value)
    data = (tmp_path / "badlut.dcm").read_bytes()
    with pytest.raises(UserError, match="upload.dcm"):
        load_image_bytes(data, "upload.dcm")
    # The server answers a UserError with a 400 (serve/app.py's exception handler), not a 500.
    with pytest.raises(UserError, match="upload.dcm"):
        decode_upload(data, "upload.dcm", max_side=10000)


def test_lut_data_shorter_than_its_descriptor_is_one_line(tmp_path):
    from echocxr.errors import UserError

    lut = _voi_lut_item(np.arange(100), 12)
    lut.LUTDescriptor = [4096, 0, 12]  # claims 4096 entries, holds 100
    write_dicom(tmp_path / "short.dcm", RAMP, tags={"VOILUTSequence": [lut]})
    with pytest.raises(UserError, match="short.dcm"):
        load_image(tmp_path / "short.dcm")
