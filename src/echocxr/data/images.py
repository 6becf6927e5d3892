"""Study images behind one API: real files (PNG, JPEG, DICOM) where they exist, phantoms otherwise.

`study_images` is what datasets and decoders call. Evaluation passes `epoch=None` and gets the same
phantom for a (study, seed, view) every time; training passes the epoch, so each epoch draws fresh
nuisance variation (position, exposure, habitus, noise) without storing images on disk.

Every real radiograph reaches the model the same way: `load_image` (a file) or `load_image_bytes`
(an upload) decodes it to grayscale, then `prepare_image` pads it to the model's square input.
Training, evaluation, `echocxr generate`, the pipeline's real-image reports and servers all use
these; docs/IMAGES.md states the rules.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from echocxr.errors import UserError

IMAGE_SOURCES: tuple[str, ...] = ("auto", "real", "phantom")
_DICOM_SUFFIXES = (".dcm", ".dicom")

# Smallest side and largest aspect ratio accepted for a radiograph. A side under 28 px (one merged
# 2x2 patch of 14 px, i.e. one vision token of the Qwen2-VL processor) or a strip longer than 10:1
# (after padding to a square, under a tenth of the model's input would be image) is almost surely the
# wrong file, and a report written from it would mean nothing: the loader refuses it by name.
MIN_SIDE = 28
MAX_ASPECT = 10.0
# The window used when a DICOM states none (or states one that cannot be used): the 0.5th and 99.5th
# percentiles of the stored values, since raw detector ranges are far wider than the anatomy's.
PERCENTILE_WINDOW = (0.5, 99.5)

# Record view spellings -> the renderer's two views.
_VIEW = {"pa": "frontal", "ap": "frontal", "frontal": "frontal", "lateral": "lateral", "ll": "lateral"}


class ImageWarning(UserWarning):
    """A file was read through a documented fallback (unusable DICOM window or rescale values, an
    unknown VOILUTFunction, no PhotometricInterpretation, extra frames ignored). The message names
    the file and the fallback."""


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())  # library messages can span lines; UserError is one line


def _to_uint8(pixels: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = (pixels.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1e-6))
    return np.clip(scaled, 0, 255).round().astype(np.uint8)


def _percentile_window(pixels: np.ndarray) -> tuple[float, float]:
    lo, hi = (float(x) for x in np.percentile(pixels, PERCENTILE_WINDOW))
    if hi <= lo:  # mostly one value: the full range keeps the rest visible
        lo, hi = float(pixels.min()), float(pixels.max())
    return lo, hi


def _dicom_number(ds, keyword: str) -> tuple[bool, float | None, str]:
    """(present, value, text) of a DS/IS element: value is the first of several, None when the
    element is empty, non-numeric or not finite; text is what the file holds, for messages."""
    if keyword not in ds:
        return False, None, ""
    try:
        value = ds[keyword].value
    except ValueError:  # pydicom set to raise on invalid values converts on access
        value = ds.get_item(keyword).value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        text = value.strip()
        value = value.split("\\")[0]
    elif isinstance(value, Sequence):  # multi-valued: the first (PS3.3 C.11.2.1.2)
        text = "\\".join(str(v) for v in value)
        value = value[0] if len(value) else None
    else:
        text = str(value)
    try:
        number = float(str(value).strip()) if value is not None else math.nan
    except ValueError:
        number = math.nan
    return True, (number if math.isfinite(number) else None), text


def _padding_mask(ds, raw: np.ndarray) -> np.ndarray | None:
    """[H, W] bool of the stored values that are padding (PS3.3 C.7.5.1.1.2): equal to
    PixelPaddingValue, or between it and PixelPaddingRangeLimit inclusive; None without padding."""
    if ds.get("PixelPaddingValue") is None:
        return None
    a = int(ds.PixelPaddingValue)
    b = int(ds.PixelPaddingRangeLimit) if ds.get("PixelPaddingRangeLimit") is not None else a
    mask = (raw >= min(a, b)) & (raw <= max(a, b))
    return mask if mask.any() and not mask.all() else None  # all padding: nothing left to exclude


VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Values -> display values in 0..255 (float) by a VOI window with ymin 0 and ymax 255:
    LINEAR (PS3.3 C.11.2.1.2.1), SIGMOID (C.11.2.1.3.1) or LINEAR_EXACT (C.11.2.1.3.2)."""
    x = np.asarray(x, dtype=np.float64)
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip(((x - center) / width + 0.5) * 255.0, 0.0, 255.0)
    if width <= 1:  # LINEAR with width 1: a threshold at c - 0.5
        return np.where(x > center - 0.5, 255.0, 0.0)
    return np.clip(((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0, 0.0, 255.0)


def _voi_lut(ds, pixels: np.ndarray) -> np.ndarray:
    """The first VOI LUT Sequence item applied (pydicom's `apply_voi`), scaled from the LUT's own
    output range 0..2^bits-1 (its LUTDescriptor's third value, PS3.3 C.11.2.1.1) onto 0..255 (float)."""
    from pydicom.pixels.processing import apply_voi

    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    out = np.asarray(apply_voi(pixels, ds, index=0), dtype=np.float64)
    top = float(2**bits - 1)
    if out.max(initial=0) > top:  # a descriptor that understates its data (seen in the wild)
        top = float(2 ** int(np.ceil(np.log2(out.max() + 1))) - 1)
    return out * (255.0 / top)


def _window_problems(values: dict, function: str) -> list[str]:
    """What makes the rescale or window values unusable (empty list when they are usable)."""
    problems = [f"{kw} {text!r}" for kw, (present, v, text) in values.items() if present and v is None]
    if values["RescaleSlope"][1] == 0:
        problems.append("RescaleSlope 0")
    if values["WindowCenter"][0] != values["WindowWidth"][0]:
        problems.append(
            "a window centre without a width"
            if values["WindowCenter"][0]
            else "a window width without a centre"
        )
    width = values["WindowWidth"][1]
    # Window Width >= 1 for LINEAR (PS3.3 C.11.2.1.2.1), > 0 for LINEAR_EXACT and SIGMOID (C.11.2.1.3)
    if width is not None and (width < 1 if function == "LINEAR" else width <= 0):
        limit = "below 1" if function == "LINEAR" else f"not above 0 ({function})"
        problems.append(f"WindowWidth {values['WindowWidth'][2]!r} {limit}")
    return problems


def _dicom_gray(ds, raw: np.ndarray, name: str) -> np.ndarray:
    """Stored values [H, W] -> display values uint8 [H, W] in the MONOCHROME2 sense (bright bone), by
    the standard's grayscale pipeline (docs/IMAGES.md): modality LUT (PS3.3 C.11.1), pixel padding
    (C.7.5.1.1.2), VOI window or LUT (C.11.2), MONOCHROME1 (C.7.6.3.1.2), Presentation LUT Shape
    (C.11.6). Unusable window or rescale values -> percentile window, one warning."""
    from pydicom.pixels import apply_modality_lut

    values = {
        kw: _dicom_number(ds, kw)
        for kw in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")
    }
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if function not in VOI_FUNCTIONS:
        warnings.warn(
            f"{name}: unknown VOILUTFunction {function!r}; using LINEAR", ImageWarning, stacklevel=4
        )
        function = "LINEAR"
    problems = _window_problems(values, function)
    pad = _padding_mask(ds, raw)
    if problems:
        # Window values are in rescaled units, so neither can be trusted without the other.
        lo_pct, hi_pct = PERCENTILE_WINDOW
        warnings.warn(
            f"{name}: unusable {', '.join(problems)}; using the {lo_pct:g}-{hi_pct:g} percentile window "
            "of the stored values",
            ImageWarning,
            stacklevel=4,
        )
        pixels = raw.astype(np.float64)
        display = _stretch(pixels, *_percentile_window(pixels if pad is None else pixels[~pad]))
    else:
        slope, intercept = values["RescaleSlope"][1], values["RescaleIntercept"][1]
        center, width = values["WindowCenter"][1], values["WindowWidth"][1]
        if values["RescaleSlope"][0] or values["RescaleIntercept"][0]:
            pixels = raw.astype(np.float64) * (1.0 if slope is None else slope) + (intercept or 0.0)
        else:  # a Modality LUT Sequence, or nothing (identity)
            pixels = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
        if center is not None and width is not None:
            display = window(pixels, center, width, function)
        elif "VOILUTSequence" in ds and len(ds.VOILUTSequence):
            display = _voi_lut(ds, pixels)
        else:  # padding takes no part in the statistics (it would pull the window towards itself)
            display = _stretch(pixels, *_percentile_window(pixels if pad is None else pixels[~pad]))
    img = np.clip(display, 0, 255).round().astype(np.uint8)
    # MONOCHROME1 stores bright air; INVERSE asks for the output inverted. The DX IOD (PS3.3
    # C.8.11.2) pairs MONOCHROME1 with INVERSE: both name the one inversion, which is done once.
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1" or shape == "INVERSE":
        img = 255 - img
    if pad is not None:
        img[pad] = 0  # background: black in the output, whatever the inversions
    return img


def _stretch(pixels: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (pixels - lo) * (255.0 / max(hi - lo, 1e-6))


def _decode_dicom(src, name: str) -> Image.Image:
    """A DICOM file -> grayscale image. Every failure, in reading or anywhere in the display pipeline
    (a malformed VOI LUT, an unusable padding value), is one `UserError` naming the file."""
    import pydicom

    try:
        ds = pydicom.dcmread(src)
        _, frames, _ = _dicom_number(ds, "NumberOfFrames")
        if frames is not None and frames > 1:
            ds.pixel_array_options(index=0)  # decode only the first frame
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        if samples == 1 and not str(ds.get("PhotometricInterpretation", "") or "").strip():
            # required (PS3.3 C.7.6.3.1.2), but pydicom's guidance and most viewers read MONOCHROME2
            warnings.warn(
                f"{name}: no PhotometricInterpretation; reading it as MONOCHROME2", ImageWarning, stacklevel=3
            )
            ds.PhotometricInterpretation = "MONOCHROME2"
        raw = ds.pixel_array
        if frames is not None and frames > 1:
            warnings.warn(f"{name}: {int(frames)} frames; using the first", ImageWarning, stacklevel=3)
        if samples > 1:  # colour (secondary capture): no VOI windowing
            rgb = raw[..., :3]
            if rgb.dtype != np.uint8:
                rgb = _to_uint8(rgb, float(rgb.min()), float(rgb.max()))
            return Image.fromarray(rgb).convert("L")
        return Image.fromarray(_dicom_gray(ds, raw, name))
    except (UserError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - a library failure on a user's file is that file's problem
        raise UserError(f"{name}: unreadable DICOM ({type(e).__name__}: {_one_line(e)})") from None


def _to_gray(im: Image.Image) -> Image.Image:
    """Any PIL mode -> "L": 16-bit and float scaled from their own min/max; transparency
    composited onto black (the film's background, as the padding); palettes through their colours."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        return Image.fromarray(_to_uint8(arr, float(arr.min()), float(arr.max())))
    if im.has_transparency_data:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
    return im if im.mode == "L" else im.convert("L")


def _decode_pil(src, name: str) -> Image.Image:
    try:
        with Image.open(src) as im:
            im.load()  # decode now so truncated or corrupt files fail here, not later
            # Cameras and some scanners store pixels unrotated plus an EXIF Orientation tag.
            return _to_gray(ImageOps.exif_transpose(im))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{name}: unreadable or corrupt image ({_one_line(e)})") from None


def _check_size(img: Image.Image, name: str) -> Image.Image:
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise UserError(
            f"{name}: {w}x{h} px is too small for a radiograph (each side must be at least {MIN_SIDE} px)"
        )
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise UserError(
            f"{name}: {w}x{h} px is a {max(w, h) / min(w, h):.0f}:1 strip, not a radiograph "
            f"(the aspect ratio must be at most {MAX_ASPECT:g}:1)"
        )
    return img


def _is_dicom(name: str, head: bytes) -> bool:
    return Path(name).suffix.lower() in _DICOM_SUFFIXES or head[128:132] == b"DICM"


def load_image(path: str | os.PathLike) -> Image.Image:
    """A grayscale ("L") image at the file's own size from PNG, JPEG or DICOM (any transfer syntax
    pydicom and the pylibjpeg plugins decode); EXIF orientation applied.

    Raises `UserError` naming the file when it is missing, unreadable, corrupt, smaller than
    MIN_SIDE px or longer than MAX_ASPECT:1; for a DICOM, any failure of decoding or of the display
    pipeline (a malformed VOI LUT) too. Warns (`ImageWarning`) when a DICOM's window or rescale
    values are unusable (percentile window instead), its VOILUTFunction is unknown (LINEAR), it
    lacks PhotometricInterpretation (MONOCHROME2) or it holds several frames (the first).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image file not found")
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError as e:
        raise UserError(f"{path}: cannot read the file ({_one_line(e)})") from None
    img = _decode_dicom(path, str(path)) if _is_dicom(str(path), head) else _decode_pil(path, str(path))
    return _check_size(img, str(path))


def load_image_bytes(data: bytes, name: str) -> Image.Image:
    """`load_image` for bytes already in memory (an upload): same formats, checks and warnings;
    `name` (the upload's file name) picks DICOM by suffix or preamble and names it in errors."""
    if not data:
        raise UserError(f"{name}: empty file")
    src = io.BytesIO(data)
    img = _decode_dicom(src, name) if _is_dicom(name, data[:132]) else _decode_pil(src, name)
    return _check_size(img, name)


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """Resize keeping the aspect ratio (longer side -> size, bilinear), centred on black."""
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = img.resize((nw, nh), Image.BILINEAR)
    if (nw, nh) == (size, size):
        return resized
    out = Image.new("L", (size, size), 0)
    out.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return out


def prepare_image(img: Image.Image, size: int) -> Image.Image:
    """The one preprocessing step from a decoded radiograph to the model's input: grayscale ("L"),
    longer side scaled to `size` px (aspect ratio kept, bilinear with antialiasing), centred on a
    black size x size square (pad, never stretch or crop). Used by training and evaluation (through
    `study_images`), `echocxr generate`, the pipeline's real-image reports and servers; the image
    processor then maps the square to the preset's image_size (docs/IMAGES.md).

    Raises ValueError when size < 1.
    """
    if size < 1:
        raise ValueError(f"size must be at least 1, not {size}")
    return fit_square(_to_gray(img), size)


def _resolve_path(p: str, root: Path | None) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() or root is None else root / path


def real_image_paths(record, views, root: Path | None) -> list[Path] | None:
    """One existing file per requested view, or None when some view has none.

    A stated view (PA/AP/frontal, LATERAL) is matched first; images without one fill the
    remaining views in their stored order (IU lists the frontal image first).
    """
    refs = [(r, _resolve_path(r.path, root)) for r in record.images]
    refs = [(r, p) for r, p in refs if p.is_file()]
    chosen: list[Path] = []
    used: set[int] = set()
    for view in views:
        hit = next(
            (
                i
                for i, (r, _) in enumerate(refs)
                if i not in used and _VIEW.get((r.view or "").lower()) == view
            ),
            None,
        )
        if hit is None:
            hit = next((i for i, (r, _) in enumerate(refs) if i not in used and r.view is None), None)
        if hit is None:
            return None
        used.add(hit)
        chosen.append(refs[hit][1])
    return chosen


def study_images(
    record,
    *,
    size: int,
    seed: int,
    epoch: int | None = None,
    source: str = "auto",
    views=("frontal",),
    root: str | os.PathLike | None = None,
) -> list[Image.Image]:
    """The study's images, one grayscale size x size image per view.

    source: "auto" uses the real files when every requested view has one (relative paths are
    resolved against `root`), phantoms otherwise; "real" requires the files; "phantom" always
    renders. Phantoms are deterministic per (study id, seed, view) when `epoch` is None and
    differ from epoch to epoch otherwise. Real images are the same every epoch (augmenting
    them is the training loop's business).
    """
    from echocxr.data.phantom import VIEWS, findings_for_record, keep_freed_memory, render_phantom, study_seed

    if source not in IMAGE_SOURCES:
        raise ValueError(f"source must be one of {IMAGE_SOURCES}, not {source!r}")
    views = tuple(views)
    bad = [v for v in views if v not in VIEWS]
    if bad:
        raise ValueError(f"views must be among {VIEWS}, not {bad}")
    root_path = Path(root) if root is not None else None
    if source != "phantom":
        paths = real_image_paths(record, views, root_path)
        if paths is not None:
            return [prepare_image(load_image(p), size) for p in paths]
        if source == "real":
            listed = ", ".join(str(_resolve_path(r.path, root_path)) for r in record.images) or "none listed"
            raise UserError(f"{record.study_id}: no image file for views {list(views)} ({listed})")
    keep_freed_memory()  # renders reuse freed heap instead of page-faulting it back in
    findings, _ = findings_for_record(record)
    s = study_seed(record.study_id, seed, epoch)
    return [Image.fromarray(render_phantom(findings, view=v, size=size, seed=s)) for v in views]
