import pytest

from echocxr.cli import main
from echocxr.data.mesh import mesh_to_findings
from echocxr.data.observations import Finding
from echocxr.data.records import ImageRef, Record, parse_report, read_jsonl, write_jsonl


def test_cli_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "data build" in out and "train" in out


def test_cli_unknown_command():
    assert main(["frobnicate"]) == 2


def test_record_roundtrip(tmp_path):
    r = Record(
        "iu:CXR1",
        "iu:CXR1",
        "iu",
        images=[ImageRef("a.png", "PA")],
        findings="No effusion.",
        impression="Normal.",
    )
    p = tmp_path / "c.jsonl"
    assert write_jsonl(p, [r]) == 1
    (back,) = list(read_jsonl(p))
    assert back == r
    assert parse_report(back.report) == {"findings": "No effusion.", "impression": "Normal."}


def test_finding_validates():
    with pytest.raises(ValueError):
        Finding("not_a_thing")
    with pytest.raises(ValueError):
        Finding("cardiomegaly", severity="huge")


def test_mesh_merges_laterality_and_drops_normal_beside_finding():
    f, unmapped = mesh_to_findings(
        ["normal", "Pleural Effusion/right", "Pleural Effusion/left/small", "Cicatrix/lung"]
    )
    assert set(f) == {"pleural_effusion"}
    assert f["pleural_effusion"].laterality == "bilateral" and f["pleural_effusion"].severity == "mild"
    assert unmapped == ["Cicatrix/lung"]
