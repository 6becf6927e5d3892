"""`echocxr bench generate`: the 100k-study estimate from benchmark JSON (per-rank rate x ranks,
one-step vs AR from `bench decode` lines), and a small end-to-end run of the benchmark."""

from __future__ import annotations

import json

import pytest

from echocxr.bench.generate import estimate
from echocxr.cli import main

BENCH = {"sharded": {"ranks": 2, "studies_per_s": 20.0}, "device": "cpu"}


def _decode(decoder, fused, batch, latency):
    return {
        "bench": "decode",
        "decoder": decoder,
        "fused": fused,
        "batch_size": batch,
        "latency_per_report_s": latency,
        "model": "qwen2.5-vl-7b",
        "device": "gpu",
    }


def test_estimate_scales_the_per_rank_rate_and_reads_decode_rows():
    rows = [
        _decode("ar", None, 1, 4.0),
        _decode("ar", None, 32, 8.0),  # the largest batch wins: 4 reports/s per GPU
        _decode("onestep", True, 32, 1.0),  # 32 reports/s
        _decode("onestep", False, 8, 1.0),
        {"bench": "serve"},  # other benchmarks' lines are ignored
    ]
    est = estimate(BENCH, rows, studies=100_000, ranks=(1, 8))
    assert est["measured"]["per_rank_studies_per_s"] == 10.0
    assert est["measured"]["scaling"] == [
        {"ranks": 1, "studies_per_s": 10.0, "hours": round(100_000 / 10 / 3600, 3)},
        {"ranks": 8, "studies_per_s": 80.0, "hours": round(100_000 / 80 / 3600, 3)},
    ]
    assert est["ar"]["reports_per_s_per_device"] == 4.0 and est["ar"]["batch_size"] == 32
    assert est["onestep"]["scaling"][1] == {"ranks": 8, "studies_per_s": 256.0, "hours": 0.109}
    assert est["onestep-unfused"]["reports_per_s_per_device"] == 8.0
    assert est["onestep_vs_ar"] == 8.0
    assert "ar" not in estimate(None, [])


@pytest.mark.slow
def test_bench_generate_end_to_end(tmp_path, capsys):
    from echocxr.data.records import Record, write_jsonl
    from echocxr.model.config import get_preset
    from echocxr.model.image_processing import make_image_processor
    from echocxr.model.tokenizer import train_bpe
    from echocxr.model.vlm import EchoVLM
    from helpers import REPORTS

    tok = train_bpe(REPORTS, 400)
    cfg = get_preset("tiny", max_response_tokens=8)
    EchoVLM.from_config(cfg, tok, seed=0).save_pretrained(
        tmp_path / "ckpt", tok, make_image_processor(cfg.image_size), extra={"stage": "dcd", "block_size": 4}
    )
    recs = [
        Record(f"iu:{i}", f"iu:{i}", "iu", "test", mesh=[["normal"], ["Cardiomegaly"]][i % 2])
        for i in range(3)
    ]
    write_jsonl(tmp_path / "eval.jsonl", recs)
    argv = [
        "bench",
        "generate",
        "--ckpt",
        tmp_path / "ckpt",
        "--corpus",
        tmp_path / "eval.jsonl",
        "--studies",
        6,
    ]
    assert main([str(a) for a in [*argv, "--work", tmp_path / "work"]]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["bench"] == "generate" and row["same_reports"] is True
    assert row["one_process"]["ranks"] == 1 and row["sharded"]["ranks"] == 2
    assert row["sharded"]["threads_per_rank"] == 1 and row["one_process"]["threads_per_rank"] == 2
    assert row["one_rank_alone"]["threads_per_rank"] == 1 and row["scaling_efficiency"] > 0
    assert row["estimate"]["measured"]["scaling"][0]["ranks"] == 1
    (tmp_path / "b.json").write_text(json.dumps(row) + "\n")
    assert main(["bench", "generate", "--estimate", str(tmp_path / "b.json")]) == 0
    assert json.loads(capsys.readouterr().out)["measured"] == row["estimate"]["measured"]
