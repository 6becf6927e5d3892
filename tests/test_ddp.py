"""DDP through torchrun: two gloo processes on CPU with batch 2 each train like one process with
batch 4 (same global batch, same examples per step, gradients averaged across ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from echocxr.cli import main
from echocxr.data.records import Record, write_jsonl

FINDINGS, IMPRESSION = "The heart is normal in size. No pleural effusion. No pneumothorax.", "Normal chest."


def _corpus(path):
    # One report text for every study (each study still gets its own phantom image), so each rank's
    # token-mean loss weighs its rows exactly as the single process does: the runs must agree to
    # float rounding, not just roughly.
    recs = [Record(f"iu:{i}", f"iu:{i}", "iu", "train", "en", [], FINDINGS, IMPRESSION) for i in range(16)]
    write_jsonl(path, recs)
    return path


def _args(corpus, out, batch):
    return ["train", "--stage", "ar", "--init", "tiny", "--corpus", str(corpus), "--out", str(out)]  + [
        "--steps", "4", "--batch-size", str(batch), "--lr", "3e-3", "--warmup", "1", "--log-every", "1",
        "--device", "cpu", "--seed", "0", "--image-source", "phantom", "--no-progress",
    ]  # fmt: skip


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    corpus = _corpus(tmp_path / "corpus.jsonl")
    torch.set_num_threads(1)
    assert main(_args(corpus, tmp_path / "single", 4)) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "echocxr", *_args(corpus, tmp_path / "ddp", 2)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    def losses(run):
        return [json.loads(s)["loss"] for s in (tmp_path / run / "log.jsonl").read_text().splitlines()]

    single, ddp = losses("single"), losses("ddp")
    assert len(single) == len(ddp) == 4
    assert single[-1] < single[0]
    for a, b in zip(single, ddp, strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    w1 = load_file(tmp_path / "single" / "final" / "model.safetensors")
    w2 = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    meta = json.loads((tmp_path / "ddp" / "final" / "echocxr.json").read_text())
    assert meta["stage"] == "ar" and meta["train"]["batch_size"] == 2
