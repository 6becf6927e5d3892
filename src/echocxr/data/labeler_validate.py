"""`echocxr data validate-labeler`: score the rule-based labeler against the IU MeSH codes.

The IU MeSH `major` terms were coded by people from each report; `mesh_to_findings` turns them
into positive findings. An observation counts as MeSH-positive when a term maps to it and as
not-positive otherwise (MeSH codes no negatives). The labeler reads FINDINGS + IMPRESSION and
counts as positive only its `positive` labels (uncertain ones are scored separately as a
sensitivity check).

Parts (`--split`): `heldout` is the 20% of studies whose SHA-256 bucket of the study id is below 20
(`heldout_part`, defined on 2026-11-30 before any error of this session was read); `dev` is the rest,
the only part whose errors are read while changing rules. Rules written before 2026-11-30 were
written on the whole archive, so only later changes are held-out-clean (docs/LABELER.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from echocxr.data.labeler import label_report
from echocxr.data.mesh import mesh_to_findings
from echocxr.data.observations import OBSERVATIONS, Finding
from echocxr.errors import UserError

HELD_OUT_PERCENT = 20  # share of the archive in the held-out part
HELD_OUT_SALT = "echocxr-labeler-heldout-v1:"  # fixed: changing it redefines the held-out part
SPLITS = ("dev", "heldout", "all")
MIN_SUPPORT = 40  # the macro-F1 target is over observations with at least this many MeSH positives


@dataclass(frozen=True)
class IUReport:
    study_id: str  # "CXR123"
    findings: str
    impression: str
    mesh: tuple[str, ...]

    @property
    def held_out(self) -> bool:
        return heldout_part(self.study_id)


def heldout_part(study_id: str) -> bool:
    """True for the held-out 20%: SHA-256(salt + study id) read as an integer, mod 100, < 20.

    A pure function of the id ("CXR123"), so the parts are the same on every machine and run.
    """
    digest = hashlib.sha256((HELD_OUT_SALT + study_id).encode("utf-8")).hexdigest()
    return int(digest, 16) % 100 < HELD_OUT_PERCENT


def select(reports: list[IUReport], split: str) -> list[IUReport]:
    """The reports of one part: "dev", "heldout" or "all". Raises UserError for another name."""
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "all":
        return list(reports)
    return [r for r in reports if r.held_out == (split == "heldout")]


def _text(node: ET.Element | None) -> str:
    return " ".join((node.text or "").split()) if node is not None else ""


def parse_iu_report(data: bytes, name: str) -> IUReport:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise UserError(f"{name}: not valid XML ({e})") from None
    uid = root.find("uId")
    if uid is None or not uid.get("id"):
        raise UserError(f"{name}: no <uId id=...> (not an IU report)")
    sections = {n.get("Label"): _text(n) for n in root.iter("AbstractText")}
    mesh = tuple(t for t in (_text(m) for m in root.findall("MeSH/major")) if t)
    return IUReport(uid.get("id"), sections.get("FINDINGS", ""), sections.get("IMPRESSION", ""), mesh)


def read_iu_archive(path: str | Path) -> list[IUReport]:
    """All reports of an Open-i `NLMCXR_reports.tgz`, ordered by study number."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: IU report archive not found")
    reports = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not (member.isfile() and member.name.endswith(".xml")):
                    continue
                f = tar.extractfile(member)
                if f is not None:
                    reports.append(parse_iu_report(f.read(), f"{path}:{member.name}"))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read the archive ({e})") from None
    if not reports:
        raise UserError(f"{path}: no IU report XML files in the archive")
    return sorted(reports, key=lambda r: int(re.sub(r"\D", "", r.study_id) or 0))


def has_codes(rep: IUReport) -> bool:
    """False for studies the coders left unindexed ("No Indexing"): they carry no human labels."""
    return bool(rep.mesh) and not all(m.lower().startswith("no indexing") for m in rep.mesh)


def _prf(tp: int, fp: int, fn: int) -> dict:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f1, 4), "support": tp + fn}


def score(reports: list[IUReport], count_uncertain: bool = False, over: list[str] | None = None) -> dict:
    """Per-observation P/R/F1/support of the labeler's positives against MeSH positives.

    Macro-F1 is over `over`, or over the observations with at least MIN_SUPPORT positives here.
    """
    counts = {o: [0, 0, 0] for o in OBSERVATIONS}  # tp, fp, fn
    wanted = ("positive", "uncertain") if count_uncertain else ("positive",)
    for rep in reports:
        if not has_codes(rep):
            continue
        truth = set(mesh_to_findings(list(rep.mesh))[0])
        labels = label_report(f"{rep.findings}\n{rep.impression}")
        pred = {o for o, f in labels.items() if f.status in wanted}
        for o in OBSERVATIONS:
            counts[o][0] += o in pred and o in truth
            counts[o][1] += o in pred and o not in truth
            counts[o][2] += o not in pred and o in truth
    per = {o: _prf(*counts[o]) for o in OBSERVATIONS}
    big = over if over is not None else [o for o in OBSERVATIONS if per[o]["support"] >= MIN_SUPPORT]
    macro = sum(per[o]["f1"] for o in big) / len(big) if big else 0.0
    return {
        "studies": sum(has_codes(r) for r in reports),
        "per_observation": per,
        "macro_f1": round(macro, 4),
        "macro_over": big,
    }


def validate(reports: list[IUReport], splits: tuple[str, ...] = SPLITS) -> dict:
    """Scores on the parts named in `splits` ("dev", "heldout", "all").

    Every part is macro-averaged over the same observations: those with support >= MIN_SUPPORT in
    the whole archive given, so the values are comparable.
    """
    everything = score(reports)
    over = everything["macro_over"]
    result: dict = {
        "min_support": MIN_SUPPORT,
        "held_out_rule": f"sha256({HELD_OUT_SALT!r} + study id) mod 100 < {HELD_OUT_PERCENT}",
    }
    for part in splits:
        result[part] = everything if part == "all" else score(select(reports, part), over=over)
    if "all" in splits:
        result["all_positive_or_uncertain"] = score(reports, count_uncertain=True, over=over)
    return result


def format_table(result: dict) -> str:
    lines = [f"{'observation':<28}{'P':>7}{'R':>7}{'F1':>7}{'support':>9}"]
    for o, m in result["per_observation"].items():
        lines.append(f"{o:<28}{m['precision']:>7.3f}{m['recall']:>7.3f}{m['f1']:>7.3f}{m['support']:>9d}")
    lines.append(
        f"macro-F1 over {len(result['macro_over'])} observations (support >= {MIN_SUPPORT} in the archive): "
        f"{result['macro_f1']:.4f} ({result['studies']} studies)"
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iu", default=None, help="the Open-i NLMCXR_reports.tgz archive")
    parser.add_argument(
        "--zh-gold",
        default=None,
        help="also score the Chinese labeler on hand-labelled sentences (JSONL: text, labels), e.g. "
        "tests/data/labeler_zh_gold.jsonl",
    )
    parser.add_argument("--out", default=None, help="also write the full result as JSON here")
    parser.add_argument(
        "--zh-coverage",
        action="store_true",
        help="also normalize every report and count how many the Chinese renderer translates",
    )
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default=None,
        help="score only this part: dev (80%%, read while writing rules), heldout (20%% by study-id "
        "hash, never read) or all (default: all three)",
    )


def run(args: argparse.Namespace) -> int:
    if args.iu is None and args.zh_gold is None:
        raise UserError("give --iu ARCHIVE, --zh-gold FILE or both")
    result: dict = {}
    if args.iu is not None:
        result = _run_iu(args)
    if args.zh_gold is not None:
        result["zh_gold"] = score_zh_gold(read_zh_gold(args.zh_gold))
        print(f"== Chinese labeler on {args.zh_gold} ==")
        print(format_zh_table(result["zh_gold"]))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return 0


def _run_iu(args: argparse.Namespace) -> dict:
    reports = read_iu_archive(args.iu)
    parts = (args.split,) if args.split else SPLITS
    result = validate(reports, parts)
    for part in parts:
        print(f"== {part} ==")
        print(format_table(result[part]))
    if args.zh_coverage:
        result["zh_coverage"] = zh_coverage(reports)
        c = result["zh_coverage"]
        print(
            f"Chinese rendering: {c['translated']}/{c['reports']} normalized reports ({c['coverage']:.1%}); "
            f"{c['empty_after_normalization']} reports had nothing readable"
        )
    return result


def read_zh_gold(path: str | Path) -> list[dict]:
    """Hand-labelled sentences: one JSON object a line, {"text", "labels": {observation: status}}.

    Raises UserError naming the file and line for a missing file, bad JSON or an unknown label.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: gold file not found")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, labels = row["text"], row["labels"]
            for obs, status in labels.items():
                Finding(obs, status)  # validates both
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}:{i}: bad gold row ({_one_line(e)})") from None
        rows.append({"text": text, "labels": dict(labels)})
    if not rows:
        raise UserError(f"{path}: no gold rows")
    return rows


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def score_zh_gold(rows: list[dict]) -> dict:
    """Per-observation precision/recall of `labeler_zh.label_report_zh` on gold sentences.

    `exact`: a (observation, status) pair counts as a hit when the labeler gives the gold status
    (a wrong status is one false positive and one false negative). `positive`: only positive labels
    count, as in the IU scores. `no_finding` is not scored (the gold labels name observations only).
    """
    from echocxr.data.labeler_zh import label_report_zh

    exact = {o: [0, 0, 0] for o in OBSERVATIONS if o != "no_finding"}
    pos = {o: [0, 0, 0] for o in exact}
    wrong = []
    for row in rows:
        got = {o: f.status for o, f in label_report_zh(row["text"]).items() if o != "no_finding"}
        want = row["labels"]
        for o in exact:
            g, w = got.get(o), want.get(o)
            exact[o][0] += g is not None and g == w
            exact[o][1] += g is not None and g != w
            exact[o][2] += w is not None and g != w
            pos[o][0] += g == "positive" and w == "positive"
            pos[o][1] += g == "positive" and w != "positive"
            pos[o][2] += w == "positive" and g != "positive"
        if got != want:
            wrong.append({"text": row["text"], "gold": want, "labeler": got})

    def table(counts: dict) -> dict:
        per = {o: _prf(*c) for o, c in counts.items() if sum(c)}
        tp, fp, fn = (sum(c[k] for c in counts.values()) for k in range(3))
        return {"per_observation": per, "micro": _prf(tp, fp, fn)}

    return {
        "sentences": len(rows),
        "sentences_all_right": len(rows) - len(wrong),
        "exact": table(exact),
        "positive": table(pos),
        "wrong": wrong,
    }


def format_zh_table(result: dict) -> str:
    lines = [f"{'observation':<28}{'P exact':>9}{'R exact':>9}{'P pos':>8}{'R pos':>8}{'labels':>8}"]
    for o, m in result["exact"]["per_observation"].items():
        p = result["positive"]["per_observation"].get(o, {"precision": 0.0, "recall": 0.0})
        lines.append(
            f"{o:<28}{m['precision']:>9.3f}{m['recall']:>9.3f}{p['precision']:>8.3f}{p['recall']:>8.3f}"
            f"{m['support']:>8d}"
        )
    e, p = result["exact"]["micro"], result["positive"]["micro"]
    lines.append(
        f"micro: exact P {e['precision']:.3f} R {e['recall']:.3f}; positive P {p['precision']:.3f} "
        f"R {p['recall']:.3f}; {result['sentences_all_right']}/{result['sentences']} sentences all right"
    )
    return "\n".join(lines)


def zh_coverage(reports: list[IUReport]) -> dict:
    """Share of normalized IU reports that `render_zh` translates (the rest are None).

    Reports whose normalized text is empty (nothing readable) are counted apart.
    """
    from echocxr.data.normalize import normalize_report
    from echocxr.data.zh import render_zh

    done = empty = 0
    for rep in reports:
        labels = label_report(f"{rep.findings}\n{rep.impression}")
        norm = normalize_report(rep.findings, rep.impression, labels)
        if not norm["findings"]:
            empty += 1  # nothing readable: the corpus build drops these
            continue
        done += render_zh(norm, labels) is not None
    n = len(reports) - empty
    return {
        "reports": n,
        "empty_after_normalization": empty,
        "translated": done,
        "coverage": round(done / max(n, 1), 4),
    }
