"""Study images behind one API: real files (PNG, JPEG, DICOM) where they exist, phantoms otherwise.

`study_images` is what datasets and decoders call. Evaluation passes `epoch=None` and gets the same
phantom for a (study, seed, view) every time; training passes the epoch, so each epoch draws fresh
nuisance variation (position, exposure, habitus, noise) without storing images on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from echocxr.errors import UserError

IMAGE_SOURCES: tuple[str, ...] = ("auto", "real", "phantom")
_DICOM_SUFFIXES = (".dcm", ".dicom")

# Record view spellings -> the renderer's two views.
_VIEW = {"pa": "frontal", "ap": "frontal", "frontal": "frontal", "lateral": "lateral", "ll": "lateral"}


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _to_uint8(pixels: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = (pixels.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1e-6))
    return np.clip(scaled, 0, 255).round().astype(np.uint8)


def _load_dicom(path: Path) -> Image.Image:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
        raw = ds.pixel_array
    except (InvalidDicomError, AttributeError, KeyError, ValueError, OSError, RuntimeError, TypeError) as e:
        raise UserError(f"{path}: unreadable DICOM ({e})") from None
    if raw.ndim == 3 and raw.shape[-1] not in (3, 4):
        raw = raw[0]  # a multi-frame file: the first frame
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    pixels = apply_modality_lut(raw, ds).astype(np.float64)
    # Windowing: the file's window centre/width (the first, when several are listed) or its VOI
    # LUT when it has one, else a robust 0.5-99.5 percentile window (raw detector ranges are far
    # wider than the anatomy's).
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center = float(np.ravel([ds.WindowCenter])[0])
        width = max(float(np.ravel([ds.WindowWidth])[0]), 1.0)
        lo, hi = center - width / 2, center + width / 2
    elif "VOILUTSequence" in ds:
        pixels = apply_voi_lut(apply_modality_lut(raw, ds), ds).astype(np.float64)
        lo, hi = float(pixels.min()), float(pixels.max())
    else:
        lo, hi = (float(x) for x in np.percentile(pixels, (0.5, 99.5)))
    img = _to_uint8(pixels, lo, hi)
    if img.ndim == 3:
        return Image.fromarray(img[..., :3]).convert("L")
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        img = 255 - img  # MONOCHROME1 stores bright air: invert so bone is bright as usual
    return Image.fromarray(img)


def load_image(path: str | os.PathLike) -> Image.Image:
    """A grayscale ("L") image from PNG, JPEG or DICOM; `UserError` naming the file when it
    is missing, unreadable or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image file not found")
    if _is_dicom(path):
        return _load_dicom(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now so truncated or corrupt files fail here, not later
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                arr = np.asarray(im, dtype=np.float64)
                return Image.fromarray(_to_uint8(arr, float(arr.min()), float(arr.max())))
            return im.convert("L")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: unreadable or corrupt image ({e})") from None


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """Resize keeping the aspect ratio, padding with black (the film's own background)."""
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = img.resize((nw, nh), Image.BILINEAR)
    if (nw, nh) == (size, size):
        return resized
    out = Image.new("L", (size, size), 0)
    out.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return out


def _resolve_path(p: str, root: Path | None) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() or root is None else root / path


def _real_paths(record, views, root: Path | None) -> list[Path] | None:
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
        paths = _real_paths(record, views, root_path)
        if paths is not None:
            return [fit_square(load_image(p), size) for p in paths]
        if source == "real":
            listed = ", ".join(str(_resolve_path(r.path, root_path)) for r in record.images) or "none listed"
            raise UserError(f"{record.study_id}: no image file for views {list(views)} ({listed})")
    keep_freed_memory()  # renders reuse freed heap instead of page-faulting it back in
    findings, _ = findings_for_record(record)
    s = study_seed(record.study_id, seed, epoch)
    return [Image.fromarray(render_phantom(findings, view=v, size=size, seed=s)) for v in views]
