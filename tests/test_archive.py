"""`echocxr generate --studies`: a DICOM folder of 20 studies gives 20 rows and a skip log naming
the other 2 files; resume after a real kill (SIGKILL) loses and repeats nothing, in 1 process
and under torchrun with 2 gloo processes; 2 ranks merge into the 1-process files byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from echocxr.cli import main
from echocxr.decode.archive import deal
from test_studies import make_archive

TIMING = ("ms",)  # wall-clock fields: the only ones allowed to differ between runs
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from echocxr.model.config import get_preset
    from echocxr.model.image_processing import make_image_processor
    from echocxr.model.tokenizer import train_bpe
    from echocxr.model.vlm import EchoVLM
    from helpers import REPORTS, widen

    tok = train_bpe(REPORTS, 400)
    cfg = get_preset("tiny", max_response_tokens=12)
    model = widen(EchoVLM.from_config(cfg, tok, seed=0).eval())  # tokens depend on the images
    out = tmp_path_factory.mktemp("ckpt") / "dcd"
    extra = {"stage": "dcd", "block_size": 4, "views": ["frontal", "lateral"]}
    model.save_pretrained(out, tok, make_image_processor(cfg.image_size), extra=extra)
    return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    return root, make_archive(root)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, iu_images):
    """120 two-view studies over the four real IU PNGs (long enough to be killed midway)."""
    pngs = sorted(iu_images.glob("*.png"))
    lines = ["study_id,path,view"]
    for i in range(120):
        lines += [f"S{i:03d},{pngs[i % 4]},PA", f"S{i:03d},{pngs[(i + 1) % 4]},LATERAL"]
    path = tmp_path_factory.mktemp("manifest") / "studies.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _args(ckpt, studies, out, *extra):
    return [
        "generate",
        "--ckpt",
        str(ckpt),
        "--studies",
        str(studies),
        "--out",
        str(out),
        "--quiet",
        *map(str, extra),
    ]


def _normalized(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return "".join(json.dumps({k: (0 if k in TIMING else v) for k, v in r.items()}) + "\n" for r in rows)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def single(ckpt, archive, tmp_path_factory):
    """The 1-process reference run over the DICOM folder (1 thread, batches of 2)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("single")
    assert main(_args(ckpt, archive[0], out, "--batch-size", "2")) == 0
    return out


def test_dicom_folder_gives_20_rows_and_a_skip_log_naming_the_2_others(single, archive):
    root, truth = archive
    rows = _rows(single / "reports.jsonl")
    assert [r["study_id"] for r in rows] == sorted(truth)
    for r in rows:
        assert [(im["view"], im["sop_instance_uid"]) for im in r["images"]] == list(
            zip(("frontal", "lateral"), truth[r["study_id"]], strict=True)
        )
        assert set(r) >= {"findings", "impression", "language", "decoder", "forwards", "ms", "tokens"}
        assert r["decoder"] == "onestep" and r["language"] == "en" and 1 <= r["tokens"] <= 12
    assert len({r["findings"] + r["impression"] for r in rows}) > 1  # the images matter
    skipped = _rows(single / "skipped.jsonl")
    assert sorted(Path(s["path"]).relative_to(root).as_posix() for s in skipped) == [
        "s00/IM0003",
        "s19/IM0009",
    ]
    assert all(s["reason"] for s in skipped)
    assert not (single / "parts").exists()


def test_rerun_of_a_finished_run_changes_nothing_and_other_settings_are_refused(
    ckpt, archive, single, capsys
):
    before = (single / "reports.jsonl").read_text()
    assert main(_args(ckpt, archive[0], single, "--batch-size", "2")) == 0
    assert (single / "reports.jsonl").read_text() == before
    capsys.readouterr()
    assert main(_args(ckpt, archive[0], single, "--decoder", "ar")) == 2
    assert "holds outputs of other settings (decode differ)" in capsys.readouterr().err


def test_sr_out_needs_dicom_sources(ckpt, manifest, tmp_path, capsys):
    rc = main(_args(ckpt, manifest, tmp_path / "o", "--sr-out", tmp_path / "sr"))
    err = capsys.readouterr().err
    assert rc == 2 and "needs DICOM sources" in err and "Traceback" not in err


def test_deal_balances_and_does_not_depend_on_the_world():
    costs = [5, 9, 9, 1, 5, 7, 3]
    one = deal(costs, 2, 0, 1)
    assert one == [[1, 2], [5, 0], [4, 6], [3]]  # longest first, ties in input order
    two = [deal(costs, 2, r, 2) for r in range(2)]
    assert two == [[one[0], one[2]], [one[1], one[3]]]


def _torchrun(args, n=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)] + [
        "-m",
        "echocxr",
        *args,
    ]


@pytest.mark.slow
def test_two_gloo_ranks_merge_into_the_single_process_files(ckpt, archive, single, tmp_path):
    out = tmp_path / "two"
    done = subprocess.run(
        _torchrun(_args(ckpt, archive[0], out, "--batch-size", "2")),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _normalized(out / "reports.jsonl") == _normalized(single / "reports.jsonl")
    assert (out / "skipped.jsonl").read_bytes() == (single / "skipped.jsonl").read_bytes()
    assert json.loads((out / "run.json").read_text())["world"] == 2
    assert not (out / "parts").exists()


def _kill_midway(cmd, watch, at_least: int):
    """Start `cmd`, SIGKILL its process group once the files `watch()` lists hold `at_least` rows."""
    proc = subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    t0 = time.time()
    while time.time() - t0 < 240:
        n = sum(p.read_text().count("\n") for p in watch() if p.is_file())
        if n >= at_least:
            break
        if proc.poll() is not None:
            raise AssertionError(f"finished or failed before the kill: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return n


def _check_resumed(out: Path, reference: Path, total: int):
    rows = _rows(out / "reports.jsonl")
    ids = [r["study_id"] for r in rows]
    assert ids == [f"S{i:03d}" for i in range(total)]  # no loss, no duplicate, input order
    text = {r["study_id"]: (r["findings"], r["impression"], r["tokens"]) for r in _rows(reference)}
    assert {r["study_id"]: (r["findings"], r["impression"], r["tokens"]) for r in rows} == text
    assert not (out / "parts").exists()


@pytest.fixture(scope="module")
def manifest_reference(ckpt, manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("manifest_ref")
    assert main(_args(ckpt, manifest, out)) == 0
    return out / "reports.jsonl"


@pytest.mark.slow
def test_one_process_killed_midway_resumes_without_loss_or_duplicates(
    ckpt, manifest, manifest_reference, tmp_path
):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "echocxr", *_args(ckpt, manifest, out, "--threads", "1")]
    n = _kill_midway(cmd, lambda: [out / "reports.jsonl"], 10)
    assert 10 <= n < 120
    assert main(_args(ckpt, manifest, out)) == 0
    _check_resumed(out, manifest_reference, 120)


@pytest.mark.slow
def test_two_ranks_killed_midway_resume_without_loss_or_duplicates(
    ckpt, manifest, manifest_reference, tmp_path
):
    out = tmp_path / "killed2"
    n = _kill_midway(_torchrun(_args(ckpt, manifest, out)), lambda: list((out / "parts").glob("*.jsonl")), 10)
    assert 10 <= n < 120
    done = subprocess.run(
        _torchrun(_args(ckpt, manifest, out)), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _check_resumed(out, manifest_reference, 120)


def test_a_study_whose_pixels_fail_goes_to_the_skip_log_and_stays_there(ckpt, tmp_path):
    from pydicom.uid import generate_uid

    from test_studies import write_dicom

    root = tmp_path / "dicom"
    for i in range(2):
        uid = generate_uid()
        write_dicom(root / f"s{i}" / "f", study_uid=uid, tags={"ViewPosition": "PA"}, seed=i)
        write_dicom(root / f"s{i}" / "l", study_uid=uid, tags={"ViewPosition": "LL"}, seed=i + 5)
    bad = root / "s1" / "l"
    bad.write_bytes(bad.read_bytes()[:-1000])  # header intact, pixel data cut short
    out = tmp_path / "out"
    for _ in range(2):  # the rerun keeps the failure in the log and does not retry it
        assert main(_args(ckpt, root, out)) == 0
        assert len(_rows(out / "reports.jsonl")) == 1
        skipped = _rows(out / "skipped.jsonl")
        assert [(s["stage"], str(bad) in s["path"]) for s in skipped] == [("load", True)]
        assert str(bad) in skipped[0]["reason"]
