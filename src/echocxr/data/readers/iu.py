"""IU X-ray (Open-i "NLMCXR") reader: the original `NLMCXR_reports.tgz` or its extracted folder.

Each XML file holds one study: `<uId id="CXR1"/>`, `AbstractText` sections labelled COMPARISON /
INDICATION / FINDINGS / IMPRESSION, human-coded MeSH `<major>` terms and one `<parentImage>` per
image, e.g. `CXR1900_IM-0584-1001`. The archive is read in place with `tarfile`.

Views are a heuristic: in this collection the last id group `-1xxx` is usually the frontal image
and `-2xxx` the lateral one, but ids such as `-3001`/`-4001` occur too and nothing in the XML states
the projection, so those are left unknown (None).
"""

from __future__ import annotations

import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from echocxr.data.readers import IssueLog, clean_text, image_ref, require_path
from echocxr.data.records import Record

SOURCE = "iu"
SECTIONS = ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION")


def iu_view(image_id: str) -> str | None:
    """Heuristic view from the image id's last group (see module docstring)."""
    tail = image_id.rsplit("-", 1)[-1]
    if len(tail) == 4 and tail.isdigit():
        return {"1": "frontal", "2": "lateral"}.get(tail[0])
    return None


def parse_iu_xml(data: bytes, name: str, images_dir: Path | None, log: IssueLog) -> Record | None:
    """One study from one XML file's bytes; None (logged) when the XML is unusable."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        log.add(SOURCE, name, "malformed_xml", str(e))
        return None
    uid = root.find("uId")
    study = uid.get("id") if uid is not None else None
    if not study:
        # The uId is the only study key; file names are not guaranteed to match it.
        log.add(SOURCE, name, "missing_study_id", "no <uId id=...>")
        return None

    sections = {s: "" for s in SECTIONS}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").upper()
        if label in sections:
            sections[label] = clean_text("".join(node.itertext()))
    mesh = [clean_text(m.text) for m in root.findall("MeSH/major") if clean_text(m.text)]

    image_ids, captions, images = [], [], []
    for node in root.findall("parentImage"):
        image_id = node.get("id") or ""
        if not image_id:
            continue
        image_ids.append(image_id)
        cap = clean_text(node.findtext("caption"))
        if cap and cap not in captions:
            captions.append(cap)
        if images_dir is not None:
            ref = image_ref(images_dir / f"{image_id}.png", iu_view(image_id), SOURCE, log)
            if ref is not None:
                images.append(ref)

    text = "\n".join(f"{s}: {sections[s]}" for s in SECTIONS if sections[s])
    study_id = f"{SOURCE}:{study}"
    return Record(
        record_id=study_id,
        study_id=study_id,
        source=SOURCE,
        images=images,
        findings=sections["FINDINGS"],
        impression=sections["IMPRESSION"],
        original={"findings": sections["FINDINGS"], "impression": sections["IMPRESSION"], "text": text},
        mesh=mesh,
        meta={
            "file": name,
            "image_ids": image_ids,
            "views": [iu_view(i) for i in image_ids],
            "exam": " | ".join(captions),
            "indication": sections["INDICATION"],
            "comparison": sections["COMPARISON"],
        },
    )


def _archive_members(path: Path, log: IssueLog) -> Iterator[tuple[str, bytes]]:
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        from echocxr.errors import UserError

        raise UserError(f"{path}: not a readable tar archive ({e})") from None
    with tar:
        try:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".xml"):
                    continue
                f = tar.extractfile(member)
                if f is not None:
                    yield f"{path.name}:{member.name}", f.read()
        except (tarfile.TarError, OSError, EOFError) as e:
            # A truncated archive: keep what was read, say where it stopped.
            log.add(SOURCE, path, "truncated_archive", str(e))


def _folder_members(path: Path, log: IssueLog) -> Iterator[tuple[str, bytes]]:
    for p in sorted(path.rglob("*.xml")):
        try:
            yield str(p), p.read_bytes()
        except OSError as e:
            log.add(SOURCE, p, "unreadable_file", str(e))


def read_iu(path: str | Path, images_dir: str | Path | None, log: IssueLog) -> Iterator[Record]:
    """Studies of the IU collection from the `.tgz` archive or a folder of its XML files."""
    p = require_path(path, "IU report archive or folder")
    img = require_path(images_dir, "IU image folder") if images_dir is not None else None
    members = _folder_members(p, log) if p.is_dir() else _archive_members(p, log)
    for name, data in members:
        rec = parse_iu_xml(data, name, img, log)
        if rec is not None:
            yield rec
