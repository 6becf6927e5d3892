"""Uploaded bytes -> a grayscale PIL image, with the server's limits; the one place uploads are read.

PNG, JPEG and DICOM are recognised by their magic bytes (never by a file name or a declared
content type). Pixel dimensions are checked from the header before the pixels are decoded.
Decoding itself is `echocxr.data.images.load_image_bytes`, the in-memory twin of the loader
`echocxr generate` uses, so a file gives the same pixels over HTTP as on the command line.
"""

from __future__ import annotations

import io

from echocxr.errors import UserError

_PNG, _JPEG = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


def kind(data: bytes) -> str | None:
    """ "png", "jpeg", "dicom" from the first bytes, else None."""
    if data.startswith(_PNG):
        return "png"
    if data.startswith(_JPEG):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def decode_upload(data: bytes, name: str, *, max_side: int):
    """bytes of one image -> grayscale ("L") PIL image.

    Raises UserError naming `name` for an empty upload, a format other than PNG/JPEG/DICOM, a
    truncated or corrupt file, a DICOM without pixel data, or a side longer than `max_side` px.
    """
    if not data:
        raise UserError(f"{name}: empty upload")
    fmt = kind(data)
    if fmt is None:
        raise UserError(f"{name}: not a PNG, JPEG or DICOM image")
    if fmt != "dicom":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                w, h = im.size
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise UserError(f"{name}: unreadable or corrupt image ({e})") from None
        if max(w, h) > max_side:
            raise UserError(f"{name}: {w}x{h} pixels is larger than the limit of {max_side} per side")
    from echocxr.data.images import load_image_bytes

    img = load_image_bytes(data, name)  # UserError names the upload
    if max(img.size) > max_side:  # DICOM: its size is known only after decoding
        raise UserError(
            f"{name}: {img.size[0]}x{img.size[1]} pixels is larger than the limit of {max_side} per side"
        )
    return img
