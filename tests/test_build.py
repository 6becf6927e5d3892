"""`echocxr data build` end to end on small IU-layout archives built in the test."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from echocxr.cli import main as cli_main
from echocxr.data.build import BuildConfig, build, drop_reason, fingerprint, is_placeholder
from echocxr.data.records import Record, read_jsonl
from echocxr.errors import UserError
from helpers import LoopbackServer

XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
  <uId id="CXR{n}"/>
  <MedlineCitation><Article><Abstract>
    <AbstractText Label="INDICATION">Cough</AbstractText>
    <AbstractText Label="FINDINGS">{findings}</AbstractText>
    <AbstractText Label="IMPRESSION">{impression}</AbstractText>
  </Abstract></Article></MedlineCitation>
  <MeSH><major>normal</major></MeSH>
  <parentImage id="CXR{n}_IM-0001-1001"><caption>{caption}</caption></parentImage>
</eCitation>
"""

NORMAL_F = "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear."
# Reports worded differently so the near-duplicate pass has distinct texts to keep.
VARIED = [
    ("Mild cardiomegaly. No pleural effusion or pneumothorax.", "Mild cardiomegaly."),
    ("Small right pleural effusion. Heart size normal.", "Small right pleural effusion."),
    ("Left lower lobe opacity concerning for pneumonia. No pneumothorax.", "Left lower lobe pneumonia."),
    ("Large left pneumothorax. No effusion.", "Large left pneumothorax."),
    ("Degenerative changes of the thoracic spine. Lungs are clear.", "No acute disease."),
    ("Calcified granuloma in the right upper lobe. No focal consolidation.", "No acute process."),
    ("Heart size is upper normal. Mild pulmonary edema.", "Mild edema."),
    ("Right PICC line tip in the SVC. Lungs clear.", "PICC in good position."),
    ("Hyperinflated lungs. No consolidation.", "Emphysema."),
    ("Bibasilar atelectasis. No effusion.", "Bibasilar atelectasis."),
]


def _tgz(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"ecgen-radiology/{name}")
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


def _archive(tmp_path: Path) -> Path:
    """40 studies: templated normals, varied abnormals, drops of each kind, one malformed file."""
    files: dict[str, str] = {}
    n = 1

    def add(findings: str, impression: str, caption: str = "Xray Chest PA and Lateral") -> None:
        nonlocal n
        files[f"{n}.xml"] = XML.format(n=n, findings=findings, impression=impression, caption=caption)
        n += 1

    for _ in range(20):  # identical templated normal reports
        add(NORMAL_F, "No acute cardiopulmonary abnormality.")
    for f, i in VARIED:
        add(f, i)
    add("", "No acute disease.")  # no FINDINGS: dropped
    add(NORMAL_F, "")  # no IMPRESSION: dropped
    add("", "")  # empty report
    add("Please see impression.", "Normal chest.")  # placeholder findings
    add(NORMAL_F, "Normal chest.", caption="Xray Chest PA and Lateral and Knee")  # not chest only
    files["broken.xml"] = "<eCitation><uId id='CXR999'/><MedlineCitation>"  # malformed XML
    return _tgz(tmp_path / "NLMCXR_reports.tgz", files)


def _cfg(tmp_path: Path, archive: Path, **kw) -> BuildConfig:
    base = dict(
        out=str(tmp_path / "out"),
        iu=str(archive),
        eval_size=4,
        val_frac=0.1,
        test_frac=0.3,
        cache_dir=str(tmp_path / "cache"),
    )
    base.update(kw)
    return BuildConfig(**base)


def _digest(folder: Path) -> dict[str, str]:
    names = ("corpus.jsonl", "eval_en.jsonl", "eval_zh.jsonl", "data_card.json", "data_card.md")
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build")
    archive = _archive(tmp)
    cfg = _cfg(tmp, archive)
    card = build(cfg)
    return tmp, archive, cfg, card


def test_build_outputs_and_card(built):
    tmp, _, cfg, card = built
    out = Path(cfg.out)
    corpus = list(read_jsonl(out / "corpus.jsonl"))
    en = [r for r in corpus if r.language == "en"]
    zh = [r for r in corpus if r.language == "zh"]

    assert card["read"] == {"iu": 35}  # the malformed file is not a study
    assert card["dropped"]["no_findings"] == {"iu": 1}
    assert card["dropped"]["no_impression"] == {"iu": 1}
    assert card["dropped"]["empty_report"] == {"iu": 1}
    assert card["dropped"]["placeholder_findings"] == {"iu": 1}
    assert card["dropped"]["non_chest_exam"] == {"iu": 1}
    # Every study read is kept or dropped for one counted reason.
    dropped = sum(sum(v.values()) for v in card["dropped"].values())
    assert card["kept_studies"]["iu"] + dropped == 35 == len(en) + dropped

    # The malformed XML is reported with its file name, not lost.
    items = card["issues"]["items"]
    assert [(i["problem"], i["file"].endswith("broken.xml")) for i in items] == [("malformed_xml", True)]
    assert "broken.xml" in (out / "data_card.md").read_text()

    # 20 identical normal reports: dedup keeps at most one in train, none equal to an eval study.
    normals = [r for r in en if r.original["findings"] == NORMAL_F]
    assert sum(r.split == "train" for r in normals) <= 1
    d = card["dedup"]
    assert len(d["removed"]) == d["removed_near_eval"] + d["removed_within_train"]
    assert not {a for a, *_ in d["removed"]} & {r.study_id for r in en}
    eval_normals = sum(r.split != "train" for r in normals)
    assert d["removed_near_eval"] + d["removed_within_train"] >= 20 - eval_normals - 1
    if eval_normals:  # a template seen in val/test leaves no training copy at all
        assert not [r for r in normals if r.split == "train"]
    assert (
        card["dropped"].get("near_duplicate_of_eval", {}).get("iu", 0)
        + card["dropped"].get("near_duplicate_in_train", {}).get("iu", 0)
        == d["removed_near_eval"] + d["removed_within_train"]
    )

    # Records: normalized target, original kept, labels from the original text, splits set.
    for r in en:
        assert r.record_id == r.study_id and r.split in ("train", "val", "test")
        assert "XXXX" not in r.findings and r.findings and r.impression
        assert set(r.original) == {"findings", "impression", "text"}
        assert all("observation" not in d for d in r.labels.values())
    pneumo = next(r for r in en if r.original["findings"].startswith("Large left pneumothorax"))
    assert pneumo.labels["pneumothorax"]["status"] == "positive"

    # Chinese copies: every val/test study that could be translated, ids with #zh, Chinese text.
    by_study = {r.study_id: r for r in en}
    for r in zh:
        assert r.record_id == r.study_id + "#zh" and r.split == by_study[r.study_id].split
        assert r.labels == by_study[r.study_id].labels
        assert not any(c.isascii() and c.isalpha() for c in r.findings.replace("PICC", ""))
    evaluation = [r for r in en if r.split != "train"]
    zh_ids = {r.study_id for r in zh}
    untranslatable = sum(card["chinese"]["untranslatable"].values())
    assert sum(r.study_id in zh_ids for r in evaluation) >= len(evaluation) - untranslatable
    assert card["chinese"]["written"].get("iu", 0) == len(zh)

    # Consistency check: every written EN target and rule-rendered ZH copy was re-labeled.
    cons = card["consistency"]
    assert cons["studies"] == len(en) and cons["checked_texts"] == {"en": len(en), "zh": len(zh)}
    assert cons["studies_with_change"] == len({i["study_id"] for i in cons["items"]}) == 0
    assert "## Consistency" in (out / "data_card.md").read_text()

    # Eval sets: test split only, capped by --eval-size.
    eval_en = list(read_jsonl(out / "eval_en.jsonl"))
    eval_zh = list(read_jsonl(out / "eval_zh.jsonl"))
    assert 0 < len(eval_en) <= 4 and len(eval_zh) <= 4
    assert all(r.split == "test" and r.language == "en" for r in eval_en)
    assert all(r.split == "test" and r.language == "zh" for r in eval_zh)


def test_rerun_is_a_noop_and_force_is_byte_identical(built, capsys):
    tmp, archive, cfg, _ = built
    out = Path(cfg.out)
    before = _digest(out)
    argv = ["data", "build", "--iu", str(archive), "--out", cfg.out, "--eval-size", "4"]
    argv += ["--val-frac", "0.1", "--test-frac", "0.3", "--cache-dir", cfg.cache_dir, "--seed", "0"]
    assert cli_main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    assert _digest(out) == before

    assert cli_main(argv + ["--force"]) == 0
    printed = capsys.readouterr().out
    assert "embedded 0 new texts" in printed  # the embedding cache served every text
    assert _digest(out) == before


def test_no_normalize_keeps_the_original_text(built):
    tmp, archive, _, _ = built
    cfg = _cfg(tmp, archive, out=str(tmp / "orig"), normalize=False, dedup=False)
    card = build(cfg)
    en = [r for r in read_jsonl(Path(cfg.out) / "corpus.jsonl") if r.language == "en"]
    assert card["text_target"] == "original" and not card["dedup"]["enabled"]
    assert all(r.findings == r.original["findings"] for r in en)
    assert all(r.impression == r.original["impression"] for r in en)
    assert sum(r.original["findings"] == NORMAL_F for r in en) == 20  # no dedup
    assert fingerprint(cfg) != fingerprint(_cfg(tmp, archive, out=str(tmp / "orig")))


def test_zh_share_zero_gives_no_training_copies(built):
    tmp, archive, _, _ = built
    cfg = _cfg(tmp, archive, out=str(tmp / "nozh"), zh_share=0.0, dedup=False)
    build(cfg)
    corpus = list(read_jsonl(Path(cfg.out) / "corpus.jsonl"))
    assert not [r for r in corpus if r.language == "zh" and r.split == "train"]
    assert [r for r in corpus if r.language == "zh" and r.split != "train"]


def test_bad_inputs_are_user_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="at least one corpus"):
        BuildConfig(out=str(tmp_path))
    with pytest.raises(UserError, match="zh-share"):
        BuildConfig(out=str(tmp_path), iu="x", zh_share=1.5)
    missing = tmp_path / "nope.tgz"
    # Through the CLI: one line on stderr, exit 2, no traceback.
    assert cli_main(["data", "build", "--iu", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nope.tgz" in err and "Traceback" not in err
    not_tar = tmp_path / "reports.tgz"
    not_tar.write_text("not an archive")
    assert cli_main(["data", "build", "--iu", str(not_tar), "--out", str(tmp_path / "o")]) == 2
    assert "reports.tgz" in capsys.readouterr().err


def _rec(findings: str, impression: str, exam: str = "Xray Chest PA and Lateral") -> Record:
    return Record(
        record_id="iu:CXR1",
        study_id="iu:CXR1",
        source="iu",
        findings=findings,
        impression=impression,
        meta={"exam": exam},
    )


def test_drop_rule():
    assert drop_reason(_rec("Lungs clear.", "Normal.")) is None
    assert drop_reason(_rec("", "Normal.")) == "no_findings"
    assert drop_reason(_rec("Lungs clear.", "")) == "no_impression"
    assert drop_reason(_rec("", "")) == "empty_report"
    assert drop_reason(_rec("XXXX XXXX.", "See impression")) == "placeholder_report"
    assert drop_reason(_rec("Lungs clear.", "Normal.", exam="Xray Chest and Abdomen")) == "non_chest_exam"
    assert is_placeholder("Please") and is_placeholder("See Impression.") and is_placeholder("XXXX.")
    assert not is_placeholder("No acute disease.")


def test_real_iu_drop_counts(iu_archive):
    """The drop rule on the real archive, without the slow steps (no dedup, no Chinese)."""
    from echocxr.data.readers import IssueLog
    from echocxr.data.readers.iu import read_iu

    reasons: dict[str | None, int] = {}
    for r in read_iu(iu_archive, None, IssueLog()):
        k = drop_reason(r)
        reasons[k] = reasons.get(k, 0) + 1
    assert sum(reasons.values()) == 3555
    assert reasons["no_findings"] > 400 and reasons[None] > 2900
    assert reasons["non_chest_exam"] > 0 and reasons["empty_report"] > 0


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_multi_source_build_keeps_official_splits_and_balances_eval(built):
    tmp, archive, _, _ = built
    root = tmp / "multi"
    # MIMIC-CXR: report tree + split table (official test studies).
    mimic = root / "mimic"
    mimic_rows = []
    for k, (f, i) in enumerate(VARIED[:6]):
        d = mimic / "files" / "p10" / f"p100000{k:02d}"
        d.mkdir(parents=True)
        (d / f"s5000000{k}.txt").write_text(f"FINAL REPORT\n FINDINGS: {f}\n\n IMPRESSION: {i}\n")
        mimic_rows.append([f"d{k}", f"5000000{k}", f"100000{k:02d}", "test" if k < 4 else "train"])
    _csv(mimic / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], mimic_rows)
    _csv(
        mimic / "mimic-cxr-2.0.0-metadata.csv",
        ["dicom_id", "subject_id", "study_id", "ViewPosition"],
        [[r[0], r[2], r[1], "PA"] for r in mimic_rows],
    )
    # CheXpert-Plus: train/valid only; a test part is carved from train by patient hash.
    header = ["path_to_image", "frontal_lateral", "ap_pa", "deid_patient_id", "report"]
    header += ["section_findings", "section_impression", "split"]
    chex_rows = [
        [f"{s}/patient{k:05d}/study1/view1_frontal.jpg", "Frontal", "PA", f"p{k}", "", f, i, s]
        for k, (f, i) in enumerate(VARIED)
        for s in (("valid",) if k < 2 else ("train",))
    ]
    chexpert = _csv(root / "df_chexpert_plus_240401.csv", header, chex_rows + [["train/broken", "row"]])
    # ReXGradient: one table per split.
    rex_header = ["StudyInstanceUid", "PatientID", "ImagePath", "ImageViewPosition", "Findings", "Impression"]
    rex = root / "rex"
    _csv(
        rex / "metadata" / "test_metadata.csv",
        rex_header,
        [[f"1.2.{k}", f"P{k}", f"deid_png/P{k}/a.png", "PA", f, i] for k, (f, i) in enumerate(VARIED[:5])],
    )
    _csv(
        rex / "metadata" / "train_metadata.csv",
        rex_header,
        [[f"1.3.{k}", f"Q{k}", f"deid_png/Q{k}/a.png", "PA", f, i] for k, (f, i) in enumerate(VARIED)],
    )
    cfg = _cfg(
        tmp,
        archive,
        out=str(tmp / "multi_out"),
        mimic=str(mimic),
        chexpert=str(chexpert),
        rexgradient=str(rex),
        dedup=False,
        eval_size=9,
    )
    card = build(cfg)
    corpus = list(read_jsonl(Path(cfg.out) / "corpus.jsonl"))
    en = {r.study_id: r for r in corpus if r.language == "en"}
    assert card["read"] == {"chexpert": 10, "iu": 35, "mimic": 6, "rexgradient": 15}
    # The broken CSV row is in the card with its file and line; the build went on.
    broken = [i["file"] for i in card["issues"]["items"] if i["problem"] == "broken_csv_row"]
    assert broken == [f"{chexpert}:12"]
    assert [en[f"mimic:s5000000{k}"].split for k in range(6)] == ["test"] * 4 + ["train"] * 2
    assert all(en[f"rexgradient:1.2.{k}"].split == "test" for k in range(5))
    # No official valid table here: a val part is carved from train, never from test.
    assert {en[f"rexgradient:1.3.{k}"].split for k in range(10)} <= {"train", "val"}
    assert [en[f"chexpert:patient{k:05d}/study1"].split for k in range(2)] == ["val", "val"]
    assert {en[f"chexpert:patient{k:05d}/study1"].split for k in range(2, 10)} <= {"train", "test"}

    # Eval: as even across sources as they allow (round robin), test split only.
    eval_en = list(read_jsonl(Path(cfg.out) / "eval_en.jsonl"))
    per_source = Counter(r.source for r in eval_en)
    available = Counter(r.source for r in en.values() if r.split == "test")
    assert len(eval_en) == min(9, sum(available.values()))
    top = max(per_source.values())
    assert all(per_source[s] >= min(available[s], top - 1) for s in available)
    assert card["eval"]["en"] == dict(sorted(per_source.items()))


class _FakeLLM(LoopbackServer):
    """A loopback OpenAI-compatible server: fixed rewrite and translation, counts requests."""

    def __init__(self):
        self.requests = 0
        super().__init__(self._answer)

    def _answer(self, path, headers, body):
        self.requests += 1
        if "Simplified Chinese" in body["messages"][0]["content"]:
            reply = {"findings": "两肺清晰。", "impression": "未见急性心肺异常。"}
        else:
            reply = {"findings": "LLM findings.", "impression": "LLM impression."}
        content = json.dumps(reply, ensure_ascii=False)
        return 200, {"choices": [{"message": {"content": content}}]}


def test_llm_build_on_loopback_uses_the_reply_cache_on_rerun(built):
    tmp, archive, _, _ = built
    with _FakeLLM() as server:
        cfg = _cfg(
            tmp,
            archive,
            out=str(tmp / "llm_out"),
            cache_dir=str(tmp / "llm_cache"),
            dedup=False,
            llm=True,
            llm_url=server.url,
            llm_model="fake",
        )
        card = build(cfg)
        sent = server.requests
        corpus = list(read_jsonl(Path(cfg.out) / "corpus.jsonl"))
        en = [r for r in corpus if r.language == "en"]
        zh = [r for r in corpus if r.language == "zh"]
        assert card["text_target"] == "llm" and card["llm_fallbacks"] == {}
        assert {(r.findings, r.impression) for r in en} == {("LLM findings.", "LLM impression.")}
        assert zh and {(r.findings, r.impression) for r in zh} == {("两肺清晰。", "未见急性心肺异常。")}
        # One request per distinct prompt: identical reports share one cached reply.
        assert 0 < sent <= len(en) + len(zh)
        before = _digest(Path(cfg.out))
        card2 = build(replace(cfg, force=True))
        assert server.requests == sent and card2["_run"]["llm_requests"] == 0
        assert _digest(Path(cfg.out)) == before


def test_label_changes_kinds():
    from echocxr.data.normalize import label_changes
    from echocxr.data.observations import Finding

    def f(**st):
        return {o: Finding(o, s) for o, s in st.items()}

    src = f(pleural_effusion="positive", pneumonia="uncertain", edema="negative", fracture="positive")
    tgt = f(
        pleural_effusion="negative", pneumonia="uncertain", atelectasis="positive", pneumothorax="negative"
    )
    got = {(c["observation"], c["kind"], c["source"], c["target"]) for c in label_changes(src, tgt)}
    assert got == {
        ("pleural_effusion", "flipped", "positive", "negative"),
        ("atelectasis", "appeared", None, "positive"),
        ("edema", "vanished", "negative", None),
        ("fracture", "vanished", "positive", None),
    }  # a negative stated only by the target (pneumothorax) is no change


def test_build_card_lists_every_label_change(tmp_path, monkeypatch):
    """A normalizer that loses a finding: the card counts and lists the study, EN and ZH."""
    import echocxr.data.normalize as normalize

    real = normalize.normalize_report

    def lossy(findings, impression, labels=None):
        out = real(findings, impression, labels)
        if "pleural effusion" in findings.lower() and "Small right pleural effusion." in out["findings"]:
            out = {
                k: v.replace("Small right pleural effusion.", "No pleural effusion.") for k, v in out.items()
            }
            out["impression"] = out["impression"] or "No pleural effusion."
        return out

    monkeypatch.setattr(normalize, "normalize_report", lossy)
    archive = _archive(tmp_path)
    cfg = _cfg(tmp_path, archive, dedup=False, zh_share=1.0)
    card = build(cfg)
    cons = card["consistency"]
    study = next(
        r.study_id
        for r in read_jsonl(Path(cfg.out) / "corpus.jsonl")
        if r.original["findings"].startswith("Small right pleural effusion")
    )
    assert cons["studies_with_change"] == 1 and cons["rate"] == round(1 / cons["studies"], 6)
    want = {"study_id": study, "observation": "pleural_effusion", "kind": "flipped"}
    langs = {i["language"] for i in cons["items"] if all(i[k] == v for k, v in want.items())}
    assert "en" in langs and langs <= {"en", "zh"}
    assert all(i["source"] == "positive" and i["target"] == "negative" for i in cons["items"])
    assert (
        f"`{study}` (en): pleural_effusion flipped (positive -> negative)"
        in (Path(cfg.out) / "data_card.md").read_text()
    )
