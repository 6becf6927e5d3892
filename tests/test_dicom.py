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
