"""`echocxr bench rehearse` at the tiny shape: every step of the 7B rehearsal, the same code path."""

from __future__ import annotations

import json
import os

import pytest
import torch

from echocxr import cli
from echocxr.bench import rehearse


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearse")
    cwd = tmp_path_factory.mktemp("cwd")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        argv = ["bench", "rehearse", "--out", str(out / "run"), "--shape", "tiny", "--dtype", "float32"]
        argv += ["--new-tokens", "8", "--batch-sizes", "1,2", "--large-batch-decoders", "onestep_fused_b8"]
        rc = cli.main(argv)
    finally:
        os.chdir(old)
    rep = json.loads((out / "run" / "rehearse.json").read_text())
    return rc, rep, cwd


def test_every_step_ran_and_wrote_nothing_outside_out(report):
    rc, rep, cwd = report
    assert rc == 0, {s: rep[s].get("error") for s in rehearse.STEPS}
    assert all(rep[s]["rc"] == 0 and rep[s]["peak_rss_mb"] > 0 for s in rehearse.STEPS)
    assert list(cwd.iterdir()) == []
    assert set(rep["targets"]) == set(rehearse.TARGETS) and rep["total_minutes"] > 0


def test_the_folder_is_a_qwen_download_and_loads_as_init(report):
    _, rep, _ = report
    assert rep["build"]["tokenizer_len"] == 151665 and rep["build"]["shards"] >= 1
    load = rep["check"]["load"]
    ids = load["special_ids"]
    assert (ids["pad"], ids["eos"], ids["vision_start"], ids["image"]) == (151643, 151645, 151652, 151655)
    assert load["mask_id"] == 151665 and load["tokenizer_len"] == 151666  # the mask token was added
    assert load["vocab_on_disk"] == 152064 and load["vocab_loaded"] >= load["tokenizer_len"]
    assert load["image_size"] == 56 and load["image_tokens"] == 4  # from preprocessor_config.json


def test_logits_match_transformers_in_fp32(report):
    lg = report[1]["check"]["logits"]
    assert lg["dtype"] == "float32" and lg["response_tokens"] == 8
    assert lg["top1_agreement"] == 1.0 and lg["max_abs_diff"] < 1e-4


def test_every_decoder_made_every_token(report):
    check = report[1]["check"]
    speed, floor = check["speed"], check["memory_floor"]
    assert floor["copy_gb_per_s"] > 0 and floor["floor_ms_per_forward"] > 0
    assert set(speed) == {f"{d}_batch1" for d in rehearse.DECODERS} | {"onestep_fused_b8_batch2"}
    assert all(r["tokens"] == 8 * r["batch_size"] and r["tokens_per_s_decode"] for r in speed.values())
    forwards = {k: r["forwards"] for k, r in speed.items()}
    assert forwards["ar_batch1"] == 7 and forwards["hf_generate_batch1"] == 7  # the prefill makes token 1
    assert forwards["onestep_fused_b8_batch1"] == 1 and forwards["onestep_vanilla_b8_batch1"] == 2
    assert forwards["block_k8_b8_batch1"] >= 8  # 8 denoising steps for the one block
    assert check["ratios"]["large_batch"] == 2 and check["ratios"]["onestep_fused_b8_vs_ar_b1"] > 0


@pytest.mark.parametrize("stage", ["ar", "rad", "dcd"])
def test_one_lora_step_per_stage_changes_only_the_adapted_weights(report, stage):
    rec = report[1][f"train_{stage}"]
    assert rec["loss_finite"] and rec["logs"]["grad_norm"] > 0
    assert rec["export"]["adapters_changed"] and rec["export"]["frozen_unchanged"]
    assert "--lora-rank 8" in rec["command"] and "--activation-checkpointing" in rec["command"]
    if stage == "dcd":  # the teacher (the student with adapters off) decoded the study
        assert "rollouts=1" in rec["dcd_round"]


def test_the_dcd_export_serves_blocks(report):
    s = report[1]["serve"]
    assert s["status_code"] == 200 and s["health"]["decoder"] == "onestep"
    assert s["sse_blocks"] >= 1 and 0 < s["time_to_first_block_s"] <= s["request_s"]


def test_the_base_teacher_is_the_student_without_adapters():
    from echocxr.model.config import get_preset
    from echocxr.model.tokenizer import train_bpe
    from echocxr.model.vlm import EchoVLM
    from echocxr.train.lora import BaseTeacher, add_lora, dcd_teacher
    from helpers import REPORTS

    model = EchoVLM.from_config(get_preset("tiny"), train_bpe(REPORTS, 300), seed=0).eval()
    teacher = dcd_teacher(model, lora_rank=4)
    assert isinstance(teacher, BaseTeacher) and teacher.to("cpu") is teacher
    x = torch.randn(1, 5, model.config.hidden_size)
    pos = torch.arange(5).expand(3, 1, 5)
    with torch.no_grad():
        base = model(x, pos)
        add_lora(model, 4)  # added after the stage is built, as `echocxr train` does
        for n, p in model.hf.named_parameters():
            if "lora_B" in n:
                p.normal_()
        student, taught = model(x, pos), teacher(x, pos)
    assert torch.equal(taught, base) and not torch.allclose(student, base)
    assert torch.equal(model(x, pos), student)  # adapters back on after the teacher's forward
    lora = [p for n, p in model.hf.named_parameters() if ".lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in teacher.student.parameters()
    )  # one set of weights
