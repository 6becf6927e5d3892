"""`torchrun --nproc-per-node 2 -m echocxr eval`: two gloo ranks decode their shards, rank 0
merges and scores once; samples.jsonl and aggregate.json equal the 1-process run's byte for byte
apart from wall-clock fields (temperature 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from echocxr.cli import main
from echocxr.data.records import ImageRef, Record, write_jsonl

TIMING = {"batch_seconds", "prefill_s", "seconds", "tokens_per_s"}  # measured, so never equal


def _zero_timing(x):
    if isinstance(x, dict):
        return {k: (0 if k in TIMING else _zero_timing(v)) for k, v in x.items()}
    if isinstance(x, list):
        return [_zero_timing(v) for v in x]
    return x


def _normalized_lines(path) -> str:
    return "".join(
        json.dumps(_zero_timing(json.loads(line))) + "\n" for line in path.read_text().splitlines()
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from echocxr.model.config import get_preset
    from echocxr.model.image_processing import make_image_processor
    from echocxr.model.tokenizer import train_bpe
    from echocxr.model.vlm import EchoVLM
    from helpers import REPORTS, widen

    root = tmp_path_factory.mktemp("eval2")
    tok = train_bpe(REPORTS, 400)
    cfg = get_preset("tiny", max_response_tokens=12)
    model = widen(EchoVLM.from_config(cfg, tok, seed=0))
    model.save_pretrained(root / "ckpt", tok, make_image_processor(cfg.image_size), extra={"stage": "ar"})
    mesh = [["normal"], ["Cardiomegaly/mild"], ["Pleural Effusion/right"], ["normal"], ["Cardiomegaly"]]
    records = [
        Record(
            record_id=f"iu:CXR{i}" + ("#zh" if i % 3 == 2 else ""),
            study_id=f"iu:CXR{i}",
            source="iu",
            split="test",
            language="zh" if i % 3 == 2 else "en",
            findings="The lungs are clear.",
            impression="No acute disease.",
            mesh=mesh[i % 5],
            images=[ImageRef(f"missing{i}.png", "PA")],
        )
        for i in range(7)
    ]
    write_jsonl(root / "eval.jsonl", records)
    return root


def _args(root):
    return ["eval", "--ckpt", str(root / "ckpt"), "--corpus", str(root / "eval.jsonl"), "--out", str(root / "ev")] + [
        "--decoder", "ar", "--batch-size", "2", "--bootstrap", "20", "--quiet",
        "--metrics", "bleu_coco,rougeL_rouge_score,phantom_f1",
    ]  # fmt: skip


@pytest.mark.slow
def test_two_ranks_eval_equals_one_process(setup, capsys):
    root = setup
    torch.set_num_threads(1)
    assert main(_args(root)) == 0
    capsys.readouterr()
    (root / "ev").rename(root / "single")  # the same --out for both runs: the same command line
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        cmd + ["-m", "echocxr", *_args(root)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = root / "single", root / "ev"
    assert _normalized_lines(two / "samples.jsonl") == _normalized_lines(one / "samples.jsonl")
    assert [json.loads(x)["record_id"] for x in (two / "samples.jsonl").read_text().splitlines()] == [
        f"iu:CXR{i}" + ("#zh" if i % 3 == 2 else "") for i in range(7)
    ]
    agg1, agg2 = (json.loads((p / "aggregate.json").read_text()) for p in (one, two))
    assert agg2["metrics"] == agg1["metrics"]  # scored once, on the merged samples: same CIs
    assert json.dumps(_zero_timing(agg2)) == json.dumps(_zero_timing(agg1))
    assert not (two / "parts").exists()
    assert done.stdout.count("# Eval:") == 1  # rank 0 prints the table, once
