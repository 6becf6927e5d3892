"""`echocxr bench decode` prints one well-formed JSON line per batch size for every decoder
(a CPU smoke run of the tiny preset; it checks the harness, not speed)."""

import json

import pytest

from echocxr.cli import main

SMOKE = ["bench", "decode", "--preset", "tiny", "--random-weights", "--max-new-tokens", "8", "--threads", "1"]
SMOKE += ["--warmup", "0", "--repeats", "1", "--block-size", "4"]


def _lines(capsys, *extra):
    rc = main([*SMOKE, *extra])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return [json.loads(x) for x in cap.out.splitlines() if x.startswith("{")]


@pytest.mark.parametrize(
    "decoder,extra,forwards",
    [
        ("ar", [], 7),  # one forward per token after the prefill's first
        ("onestep", [], 2),  # fused: one forward per block of 4
        ("onestep", ["--no-fuse"], 4),  # denoise + commit per block
        (
            "block",
            ["--steps", "2"],
            None,
        ),  # K denoising steps per block plus commits: its own tests count them
    ],
)
def test_one_json_line_per_batch_size(capsys, tmp_path, decoder, extra, forwards):
    log = tmp_path / "bench.jsonl"
    rows = _lines(capsys, "--decoder", decoder, "--batch-size", "1,2", "--append", str(log), *extra)
    assert [r["batch_size"] for r in rows] == [1, 2]
    assert [json.loads(x) for x in log.read_text().splitlines()] == rows
    # one engine: one KV cache per batch size, none allocated by the warm-up or timed repeats
    assert [r["kv_allocations"] for r in rows] == [1, 2]
    for r in rows:
        assert r["decoder"] == decoder and r["ignore_eos"] is True
        assert r["tokens"] == 8 * r["batch_size"] and r["longest"] == 8  # EOS ignored: full length
        if forwards is not None:
            assert r["forwards"] == forwards
        assert r["forwards_per_token"] == pytest.approx(r["forwards"] / 8, abs=1e-4)
        assert r["e2e_ms"] > 0 and r["prefill_ms"] > 0
        assert r["tokens_per_s_e2e"] == pytest.approx(r["tokens"] / (r["e2e_ms"] / 1e3), rel=0.01)
        # the engine times the prefill inside each run, so the decode time is known
        assert r["prefill_timing"] == "in-run"
        assert r["decode_ms"] > 0 and r["tokens_per_s_decode"] > r["tokens_per_s_e2e"]
        assert r["device"].startswith("cpu") and r["torch"] and r["date"]
        assert r["peak_mem_mb"] > 0


def test_bad_options_are_one_line_errors(capsys):
    assert main([*SMOKE, "--batch-size", "1,x"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert main(["bench", "decode", "--preset", "tiny"]) == 2
    assert "--random-weights" in capsys.readouterr().err
    assert main([*SMOKE, "--image-size", "50"]) == 2
    assert "multiple of" in capsys.readouterr().err
    assert main([*SMOKE, "--graphs"]) == 2
    assert "CUDA" in capsys.readouterr().err
    assert main(["bench", "decode", "--ckpt", "/nonexistent/ckpt"]) == 2
    assert "/nonexistent/ckpt" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("decoder", ["ar", "onestep"])
def test_graph_steps_run_on_gpu(capsys, decoder):
    rows = _lines(capsys, "--decoder", decoder, "--batch-size", "2", "--device", "cuda", "--graphs")
    assert rows[0]["mode"] == "graph" and rows[0]["tokens"] == 16 and rows[0]["peak_mem_mb"] > 0
