"""FSDP2 through torchrun: two gloo processes on CPU (batch 2 each, every decoder layer, the vision
tower and the root sharded, activation checkpointing on) train like one process with batch 4, and
a run resumed from its sharded checkpoint (torch.distributed.checkpoint) ends with the weights of
the uninterrupted run. The final export is a plain Hugging Face folder that `EchoVLM.from_pretrained`
loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from echocxr.cli import main
from echocxr.data.records import Record, write_jsonl
from echocxr.model.vlm import EchoVLM

FINDINGS, IMPRESSION = "The heart is normal in size. No pleural effusion. No pneumothorax.", "Normal chest."


def _corpus(path):
    # one report text for every study, so each rank's token-mean loss weighs its rows exactly as
    # the single process does (see tests/test_ddp.py)
    recs = [Record(f"iu:{i}", f"iu:{i}", "iu", "train", "en", [], FINDINGS, IMPRESSION) for i in range(16)]
    write_jsonl(path, recs)
    return path


def _args(corpus, out, batch, *extra):
    return ["train", "--stage", "ar", "--init", "tiny", "--corpus", str(corpus), "--out", str(out)] + [
        "--steps", "4", "--batch-size", str(batch), "--lr", "3e-3", "--warmup", "1", "--log-every", "1",
        "--device", "cpu", "--seed", "0", "--image-source", "phantom", "--no-progress", *extra,
    ]  # fmt: skip


def _torchrun(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*cmd, "-m", "echocxr", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _losses(out):
    return [json.loads(s)["loss"] for s in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fsdp2_matches_single_process_and_resumes_exactly(tmp_path):
    corpus = _corpus(tmp_path / "corpus.jsonl")
    torch.set_num_threads(1)
    assert main(_args(corpus, tmp_path / "single", 4)) == 0
    fsdp = ["--fsdp", "--activation-checkpointing", "--save-every", "2"]
    log = _torchrun(_args(corpus, tmp_path / "fsdp", 2, *fsdp), tmp_path)
    n_params = len(list(EchoVLM.from_pretrained(tmp_path / "single" / "final")[0].parameters()))
    assert f"FSDP2: {n_params} of {n_params} parameter tensors sharded over 2 ranks" in log

    # Same global batch, gradients averaged over ranks: equal up to float summation order.
    single, sharded = _losses(tmp_path / "single"), _losses(tmp_path / "fsdp")
    assert len(single) == len(sharded) == 4 and single[-1] < single[0]
    for a, b in zip(single, sharded, strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    w1 = load_file(tmp_path / "single" / "final" / "model.safetensors")
    w2 = load_file(tmp_path / "fsdp" / "final" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    step2 = tmp_path / "fsdp" / "ckpt" / "step_0000002"
    assert (step2 / "sharded").is_dir() and (step2 / "trainer.pt").is_file()

    # Killed right after the step-2 checkpoint: a new folder holding only what was on disk then.
    resumed = tmp_path / "resumed"
    (resumed / "ckpt").mkdir(parents=True)
    shutil.copytree(step2, resumed / "ckpt" / step2.name)
    shutil.copytree(tmp_path / "fsdp" / "tokenizer", resumed / "tokenizer")
    _torchrun(_args(corpus, resumed, 2, *fsdp, "--resume"), tmp_path)
    assert _losses(resumed) == _losses(tmp_path / "fsdp")[2:]
    w3 = load_file(resumed / "final" / "model.safetensors")
    for k in w2:
        assert torch.equal(w3[k], w2[k]), k

    model, *_ = EchoVLM.from_pretrained(resumed / "final")
    assert torch.equal(model.hf.lm_head.weight, w2["lm_head.weight"])


@pytest.mark.slow
def test_fsdp2_stage0_exports_the_gathered_head(tmp_path):
    """Stage 0 under FSDP2: its head, a shard on each rank, is gathered before it is written beside
    the plain HF folder (a sharded head would not serialize)."""
    corpus = _corpus(tmp_path / "corpus.jsonl")
    args = _args(corpus, tmp_path / "vision", 2, "--fsdp")
    args[args.index("ar")] = "vision"
    args[args.index("--steps") + 1] = "2"
    _torchrun(args, tmp_path)
    final = tmp_path / "vision" / "final"
    head = load_file(final / "vision_head.safetensors")
    single = EchoVLM.from_pretrained(final)[0]
    assert head["weight"].shape[1] == single.config.hidden_size  # the merger's output width
    assert all(t.isfinite().all() for t in head.values())
