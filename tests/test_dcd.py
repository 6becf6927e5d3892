"""DCD: the top-k KL and its bounds, step weights, the EOS term, the repetition filter, and the
student's RAD-layout logits against an uncached reference of what the one-step decoder sees."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from echocxr.batch import Example, collate
from echocxr.model.config import get_preset
from echocxr.model.image_processing import make_image_processor
from echocxr.model.tokenizer import train_bpe
from echocxr.model.vlm import EchoVLM
from echocxr.train.dcd import (
    NO_TARGET,
    Targets,
    bucket_log_probs,
    dcd_loss,
    kl_topk,
    rad_student_logits,
    repetition_loop,
    step_weights,
    topk_target,
)
from helpers import REPORTS as TEXTS
from helpers import noise_image, prefer_banned, widen


def _pair(n=64, V=50, seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, V, generator=g) * sharp
    student = torch.randn(n, V, generator=g) * sharp
    return teacher, student


def _full_kl(p_logits, q_logits):  # KL(p || q) per row
    return F.kl_div(
        q_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)


def test_topk_kl_with_all_tokens_is_the_full_kl():
    teacher, student = _pair()
    idx, p, rest = topk_target(teacher.softmax(-1), teacher.shape[-1])
    torch.testing.assert_close(
        kl_topk(student, idx, p, rest), _full_kl(teacher, student), atol=1e-5, rtol=1e-4
    )
    rev = kl_topk(student, idx, p, rest, "reverse")
    torch.testing.assert_close(rev, _full_kl(student, teacher), atol=1e-4, rtol=1e-4)


def test_topk_kl_lower_bounds_the_full_kl_and_tightens_with_k():
    teacher, student = _pair()
    full = _full_kl(teacher, student)
    prev = torch.zeros_like(full)
    for k in (1, 4, 16, 49):
        idx, p, rest = topk_target(teacher.softmax(-1), k)
        kl = kl_topk(student, idx, p, rest)
        assert (kl >= -1e-6).all() and (kl <= full + 1e-5).all()  # coarser buckets: lower KL
        assert (kl >= prev - 1e-5).all()  # refining the buckets never lowers it
        prev = kl


def test_kl_is_zero_only_for_the_teacher_itself():
    teacher, student = _pair()
    idx, p, rest = topk_target(teacher.softmax(-1), 8)
    assert kl_topk(teacher, idx, p, rest).abs().max() < 1e-5
    assert kl_topk(teacher, idx, p, rest, "reverse").abs().max() < 1e-5
    assert kl_topk(student, idx, p, rest).min() > 1e-3


def test_bucket_log_probs_sum_to_one():
    _, student = _pair()
    idx = torch.randperm(50)[:7].expand(64, 7)
    log_top, log_rest = bucket_log_probs(student, idx)
    total = torch.cat([log_top, log_rest[:, None]], -1).logsumexp(-1)
    torch.testing.assert_close(total, torch.zeros(64), atol=1e-5, rtol=0)


def test_step_weights_grow_linearly_from_one_to_one_plus_alpha():
    four = torch.full((5,), 4)
    w = step_weights(torch.tensor([0, 1, 2, 3, NO_TARGET]), four, alpha=2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 1 + 2 / 3, 1 + 4 / 3, 3.0, 1.0]))
    assert torch.equal(
        step_weights(torch.tensor([0, 0]), torch.ones(2, dtype=torch.long), 2.0), torch.ones(2)
    )
    assert torch.equal(step_weights(torch.tensor([0, 3]), four[:2], alpha=0.0), torch.ones(2))


def test_step_weights_are_normalised_by_the_steps_each_block_took():
    """A teacher run with K = 8 that finished a block in 3 steps: that block's last commit weighs
    1 + alpha, not 1 + alpha * 2 / 7 (issue #20, item 1)."""
    step = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7])
    block_steps = torch.tensor([3, 3, 3, 8, 8, 8, 8, 8, 8, 8, 8])
    w = step_weights(step, block_steps, alpha=1.0)
    torch.testing.assert_close(w[:3], torch.tensor([1.0, 1.5, 2.0]))
    torch.testing.assert_close(w[3:], 1 + torch.arange(8.0) / 7)
    assert w[2] == w[-1] == 2.0


def _targets(teacher_logits, tokens, step, steps=4, k=8, eos=None):
    B, R, V = teacher_logits.shape
    idx, p, rest = topk_target(teacher_logits.softmax(-1), k)
    block_steps = torch.where(step == NO_TARGET, 0, steps)
    end = torch.zeros(B, R, dtype=torch.bool)
    if eos is not None:
        for b in range(B):
            hit = (tokens[b] == eos).nonzero()
            if len(hit):
                end[b, hit[0, 0]] = True
    return Targets(tokens, step, idx, p, rest, block_steps, end)


def test_dcd_loss_terms():
    B, R, V, eos = 2, 8, 30, 5
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(B, R, V, generator=g) * 3
    student = torch.randn(B, R, V, generator=g) * 3
    tokens = teacher.argmax(-1)
    tokens[tokens == eos] = eos + 1  # the only EOS are the ends set here
    tokens[0, 6:] = eos
    tokens[1, 4:] = eos
    step = torch.tensor([[0, 1, 2, 3, 0, 1, NO_TARGET, NO_TARGET], [3, 2, 1, 0, 0, 1, 2, 3]])
    t = _targets(teacher, tokens, step, eos=eos)
    has = step != NO_TARGET
    kl = kl_topk(student[has], t.top_idx[has], t.top_p[has], t.rest[has])
    w = 1 + step[has].float() / 3
    # the EOS term sits on each row's first EOS only (rows 0 and 1: positions 6 and 4), not on
    # the EOS padding after it
    ends = torch.stack([student[0, 6], student[1, 4]])
    eos_ce = F.cross_entropy(ends, torch.tensor([eos, eos]))
    loss, logs = dcd_loss(student, t, eos, alpha=1.0, eos_weight=0.5)
    torch.testing.assert_close(loss, (w * kl).sum() / w.sum() + 0.5 * eos_ce)
    assert logs["eos_ce"] == pytest.approx(float(eos_ce), rel=1e-5)
    plain, _ = dcd_loss(student, t, eos, alpha=0.0, eos_weight=0.0)
    torch.testing.assert_close(plain, kl.mean())
    # positions without a target do not matter
    other = student.clone()
    other[0, 6:] += 100.0 * torch.randn(2, V, generator=g)
    same, _ = dcd_loss(other, t, eos, eos_weight=0.0)
    torch.testing.assert_close(same, dcd_loss(student, t, eos, eos_weight=0.0)[0])


def test_forward_kl_gradient_moves_the_student_to_the_teacher():
    teacher, _ = _pair(n=16, V=20, seed=3)
    idx, p, rest = topk_target(teacher.softmax(-1), 8)
    student = torch.zeros(16, 20, requires_grad=True)
    start = kl_topk(student, idx, p, rest).detach()
    opt = torch.optim.Adam([student], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        kl_topk(student, idx, p, rest).mean().backward()
        opt.step()
    end = kl_topk(student, idx, p, rest)
    assert (end < 0.01 * start).all()


def test_repetition_loop_detector():
    assert repetition_loop([1, 2, 3, 4] * 3 + [9])
    assert repetition_loop([7] * 12)
    assert repetition_loop([5, 6] + [1, 2, 3, 4, 5, 6] * 3)
    assert not repetition_loop([7] * 11 + [8])  # 11 of the same token: below the 12-token span
    assert not repetition_loop([1, 2, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])  # a stutter
    assert not repetition_loop(list(range(40)))
    assert not repetition_loop([])


@pytest.fixture(scope="module")
def tiny():
    tok = train_bpe(TEXTS, 400)
    cfg = get_preset("tiny")
    model = EchoVLM.from_config(cfg, tok, seed=0).eval()
    widen(model)
    return model, tok, make_image_processor(cfg.image_size), cfg


def _batch(tok, proc, cfg, texts):
    rng = np.random.default_rng(2)
    img = lambda: noise_image(rng)  # noqa: E731
    exs = [Example([img()], "en", texts[0]), Example([img(), img()], "zh", texts[1])]
    return collate(exs, tok, proc, cfg.image_tokens, multiple_of=4)


@pytest.mark.parametrize("shift", [True, False])
def test_rad_layout_logits_equal_what_the_one_step_decoder_sees(tiny, shift):
    """Block i of the layout = a plain forward over [prompt | clean blocks < i | mask block]."""
    model, tok, proc, cfg = tiny
    batch = _batch(tok, proc, cfg, TEXTS[:2])
    clean, blk = batch.response_ids, 4
    rows, P = batch.prompt_ids.shape
    with torch.no_grad():
        got = rad_student_logits(model, batch, clean, blk, shift)
        for i in range(clean.shape[1] // blk):
            ids = torch.cat(
                [batch.prompt_ids, clean[:, : i * blk], torch.full((rows, blk), model.special.mask)], 1
            )
            S = ids.shape[1]
            valid = torch.cat([batch.prompt_valid, torch.ones(rows, S - P, dtype=torch.bool)], 1)
            q, k = torch.arange(S)[:, None], torch.arange(S)[None]
            rule = torch.where(q < P, k <= q, (k < P) | ((k - P) // blk <= (q - P) // blk))
            mask = (rule[None] & valid[:, None]) | torch.eye(S, dtype=torch.bool)
            x = model.embed(ids, batch.pixel_values, batch.grid_thw)
            ref = model.logits(model(x, model.positions(ids, batch.grid_thw, valid), mask[:, None]))
            want = ref[:, S - blk - 1 : S - 1] if shift else ref[:, S - blk :]
            torch.testing.assert_close(got[:, i * blk : (i + 1) * blk], want, atol=2e-4, rtol=1e-4)


def test_stratified_sample_spreads_over_sources():
    from types import SimpleNamespace

    from echocxr.train.dcd import stratified_sample

    recs = [
        SimpleNamespace(source=s, i=i)
        for s, n in (("iu", 60), ("mimic", 30), ("rexgradient", 3))
        for i in range(n)
    ]
    got = stratified_sample(recs, 20, seed=0)
    counts = {s: sum(r.source == s for r in got) for s in ("iu", "mimic", "rexgradient")}
    assert sum(counts.values()) == 20 and len({id(r) for r in got}) == 20
    assert counts["rexgradient"] >= 1 and counts["iu"] > counts["mimic"] > counts["rexgradient"]
    assert stratified_sample(recs, 20, seed=0) == got and stratified_sample(recs, 20, seed=1) != got
    assert len(stratified_sample(recs, 500, seed=0)) == 93


def test_config_rejects_bad_choices():
    from echocxr.errors import UserError
    from echocxr.train.dcd import DCDConfig

    with pytest.raises(UserError, match="--kl"):
        DCDConfig(kl="sideways")
    with pytest.raises(UserError, match="--teacher-steps"):
        DCDConfig(block_size=4, teacher_steps=8)


def _synthetic_stage(model, tok, proc, cfg, **kw):
    """A stage whose rollouts are built by hand: a sharp random teacher distribution per position."""
    from echocxr.train.dcd import DCDConfig, DCDStage, Rollout

    rng = np.random.default_rng(3)
    img = lambda: noise_image(rng)  # noqa: E731
    exs = [Example([img()], "en", None, f"s{i}") for i in range(3)]
    dcfg = DCDConfig(block_size=4, top_k=8, **kw)
    stage = DCDStage(dcfg, tok, proc, lambda r: exs, teacher=None)
    stage.examples = exs
    g = torch.Generator().manual_seed(0)
    eos, V = model.special.eos, model.vocab_size
    for i, R in enumerate((8, 12, 4)):
        teacher = torch.randn(R, V, generator=g) * 4
        idx, p, rest = topk_target(teacher.softmax(-1), 8)
        tokens = teacher.argmax(-1)
        tokens[tokens == eos] = eos + 1
        tokens[-2:] = eos
        step = torch.arange(R) % 4
        step[-1] = NO_TARGET  # after the first EOS (position R - 2)
        block_steps = torch.full((R,), 4)
        stage.rollouts.append(Rollout(i, tokens, step, idx.int(), p, rest, block_steps, R - 2))
    stage.round = 0
    return stage


def test_stage_loss_trains_the_student_and_survives_a_resume(tiny):
    model, tok, proc, cfg = tiny
    stage = _synthetic_stage(model, tok, proc, cfg)
    student = EchoVLM.from_config(cfg, tok, seed=1).train()
    batch = _batch(tok, proc, cfg, TEXTS[:2])  # the loop's batch: only its size matters for DCD
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        loss, logs = stage.loss(student, batch, step % 2)  # two fixed draws, so the loss can fall
        assert set(logs) >= {"kl", "eos_ce"} and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    again = _synthetic_stage(model, tok, proc, cfg)
    again.rollouts, again.round = [], -1
    again.load_state_dict(stage.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again.loss(student, batch, 5)[0], stage.loss(student, batch, 5)[0])


def test_ablation_switches_change_the_objective(tiny):
    model, tok, proc, cfg = tiny
    batch = _batch(tok, proc, cfg, TEXTS[:2])
    with torch.no_grad():
        fwd = _synthetic_stage(model, tok, proc, cfg).loss(model, batch, 0)
        rev = _synthetic_stage(model, tok, proc, cfg, kl="reverse").loss(model, batch, 0)
        no_eos = _synthetic_stage(model, tok, proc, cfg, eos_weight=0.0).loss(model, batch, 0)
        no_w = _synthetic_stage(model, tok, proc, cfg, alpha=0.0).loss(model, batch, 0)
        ft = _synthetic_stage(model, tok, proc, cfg, objective="onestep-ft").loss(model, batch, 0)
    assert float(rev[0]) != pytest.approx(float(fwd[0]))
    assert float(no_eos[0]) == pytest.approx(fwd[1]["kl"], rel=1e-5)
    assert no_w[1]["kl"] != pytest.approx(fwd[1]["kl"])
    # onestep-ft: the CE of the fully masked one-step student on the loop's ground-truth batch
    from echocxr.model.layout import AR_SHIFT

    with torch.no_grad():
        logits = rad_student_logits(model, batch, batch.response_ids, 4, AR_SHIFT)
    ce = F.cross_entropy(logits.flatten(0, 1), batch.response_ids.flatten())
    assert set(ft[1]) == {"ce"} and float(ft[0]) == pytest.approx(float(ce), rel=1e-5)


def test_topk_kl_gap_report():
    from echocxr.train.dcd import topk_kl_gap

    teacher, student = _pair(n=32, V=100, seed=5)
    gap = topk_kl_gap(teacher, student, ks=(8, 32, 64, 100))
    assert gap["top8_kl"] <= gap["top32_kl"] + 1e-5 <= gap["top64_kl"] + 2e-5
    assert gap["top100_kl"] == pytest.approx(gap["full_kl"], rel=1e-4)
    assert 0 < gap["top8_mass"] < gap["top64_mass"] < gap["top100_mass"] + 1e-6


def test_phase1_rollouts_from_the_block_decoder_match_phase2_inputs(tiny):
    """Rollouts from decode.block: targets on every decoded position, and at step 0 (block fully
    masked, teacher context before it) the teacher's recorded distribution is exactly what the
    student's RAD-layout forward computes with the teacher's weights, under the same guard."""
    from echocxr.train.dcd import DCDConfig, DCDStage, collect_rollouts

    model, tok, proc, cfg = tiny
    rng = np.random.default_rng(4)
    img = lambda: noise_image(rng)  # noqa: E731
    exs = [Example([img()], lang, None, f"s{i}") for i, lang in enumerate(["en", "zh", "en", "en"])]
    dcfg = DCDConfig(block_size=4, top_k=16, max_new_tokens=24, collect_batch=3)
    rollouts, stats = collect_rollouts(model, exs, tok, proc, dcfg)
    assert stats["rollouts"] + stats["discarded_loops"] == 4 and stats["rollouts"] >= 1
    stage = DCDStage(dcfg, tok, proc, lambda r: exs, teacher=model)
    stage.examples = exs
    for r in rollouts:
        last = r.end if r.end >= 0 else len(r.tokens) - 1
        assert len(r.tokens) % 4 == 0 and (r.step[: last + 1] >= 0).all() and (r.step < 4).all()
        assert (r.step[last + 1 :] == NO_TARGET).all()
        assert (r.block_steps[: last + 1] >= 1).all() and (r.block_steps <= 4).all()
        torch.testing.assert_close(r.top_p.sum(-1) + r.rest, torch.ones(len(r.tokens)), atol=1e-5, rtol=0)
    sb, t = stage.student_batch(rollouts, model)
    from echocxr.model.denoise import banned_tokens, guard

    with torch.no_grad():  # the teacher records its guarded distribution (no mass on banned ids)
        probs = guard(rad_student_logits(model, sb, t.tokens, 4), banned_tokens(model, tok)).softmax(-1)
    first = t.step == 0
    assert first.any()
    got = probs.gather(-1, t.top_idx)[first]
    torch.testing.assert_close(got, t.top_p[first], atol=2e-4, rtol=1e-3)


def test_rollouts_shared_out_across_ranks_equal_one_rank(tiny):
    """Under DDP/FSDP rank r decodes studies r, r + world, ...: the shares of two ranks together are
    the rollouts one process decodes, each study once (collect_rollouts then exchanges them)."""
    from echocxr.train.dcd import DCDConfig, decode_share

    model, tok, proc, cfg = tiny
    rng = np.random.default_rng(5)
    exs = [Example([noise_image(rng)], "en", None, f"s{i}") for i in range(5)]
    dcfg = DCDConfig(block_size=4, top_k=8, max_new_tokens=8, collect_batch=2)
    whole, looped, _ = decode_share(model, exs, range(5), tok, proc, dcfg)
    shares = [decode_share(model, exs, range(r, 5, 2), tok, proc, dcfg) for r in (0, 1)]
    assert [r.example for r in shares[0][0]] == [i for i in (0, 2, 4) if i in {w.example for w in whole}]
    merged = sorted(shares[0][0] + shares[1][0], key=lambda r: r.example)
    assert shares[0][1] + shares[1][1] == looped
    assert [r.example for r in merged] == [r.example for r in whole]
    for a, b in zip(merged, whole, strict=True):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.step, b.step)


def _corpus(tmp_path):
    from echocxr.data.records import Record, write_jsonl

    recs = []
    for i, (src, text) in enumerate(
        [("iu", TEXTS[0]), ("iu", TEXTS[1]), ("mimic", TEXTS[0]), ("chexpert", TEXTS[1])] * 2
    ):
        findings, _, impression = text.partition("\nImpression: ")
        recs.append(
            Record(
                f"{src}:{i}",
                f"{src}:{i}",
                src,
                "train",
                "en",
                findings=findings.removeprefix("Findings: "),
                impression=impression,
            )
        )
    recs.append(Record("iu:t", "iu:t", "iu", "test", "en", findings="No effusion.", impression="Normal."))
    write_jsonl(tmp_path / "corpus.jsonl", recs)
    return tmp_path / "corpus.jsonl"


def test_build_stage_runs_a_round_and_trains(tiny, tmp_path):
    """build_stage from CLI arguments and a saved tiny RAD checkpoint: round 0 collects rollouts
    with decode.block from the --teacher checkpoint, a few steps lower the loss, and the
    checkpoint meta carries the block size."""
    import argparse

    from echocxr.train.dcd import add_stage_arguments, build_stage

    model, tok, proc, cfg = tiny
    model.save_pretrained(tmp_path / "rad", tok, proc, extra={"stage": "rad", "block_size": 4})
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus")
    parser.add_argument("--init")
    parser.add_argument("--steps", type=int)
    add_stage_arguments(parser)
    args = parser.parse_args(
        [
            "--corpus",
            str(_corpus(tmp_path)),
            "--init",
            str(tmp_path / "rad"),
            "--teacher",
            str(tmp_path / "rad"),
        ]
        + ["--distill-studies", "6", "--max-new-tokens", "12", "--top-k", "8", "--collect-batch", "4"]
        + ["--rounds", "2", "--refresh", "student", "--steps", "12"]
    )
    student, tok2, proc2, _ = EchoVLM.from_pretrained(tmp_path / "rad")
    stage = build_stage(args, student, tok2, proc2)
    assert stage.cfg.block_size == 4 and stage.multiple_of == 4
    assert not any(p.requires_grad for p in student.visual.parameters())
    stage.on_round_start(student, 0)
    assert len(stage.examples) == 6
    assert {ex.record_id.split(":")[0] for ex in stage.examples} == {"iu", "mimic", "chexpert"}
    stage.on_round_start(student, 0)  # a loop repeating the hook collects nothing twice
    assert (
        len(stage.collect_stats) == 1
        and stage.collect_stats[0]["rollouts"] + stage.collect_stats[0]["discarded_loops"] == 6
    )
    batch = SimpleNamespace(size=4)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    first = None
    for _ in range(6):
        loss, logs = stage.loss(student, batch, 0)  # one fixed draw: the loss must fall
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    assert (
        stage.checkpoint_meta["block_size"] == 4 and stage.checkpoint_meta["dcd_rounds"][0]["by"] == "teacher"
    )


def test_echocxr_train_stage_dcd_cli(tiny, tmp_path):
    """`echocxr train --stage dcd` through the shared training CLI: one round of a few steps from a
    tiny RAD checkpoint saved here; the final checkpoint decodes with the one-step decoder."""
    from echocxr.cli import main
    from echocxr.decode.api import DecodeConfig, generate

    model, tok, proc, cfg = tiny
    model.save_pretrained(tmp_path / "rad", tok, proc, extra={"stage": "rad", "block_size": 4})
    out = tmp_path / "dcd"
    argv = ["train", "--stage", "dcd", "--init", str(tmp_path / "rad"), "--corpus", str(_corpus(tmp_path))]
    argv += ["--out", str(out), "--steps", "3", "--batch-size", "2", "--device", "cpu", "--seed", "0"]
    argv += ["--log-every", "1", "--block-size", "4", "--distill-studies", "4", "--max-new-tokens", "12"]
    argv += ["--top-k", "8", "--image-source", "phantom"]
    assert main(argv) == 0
    student, tok2, proc2, meta = EchoVLM.from_pretrained(out / "final")
    batch = _batch(tok2, proc2, cfg, TEXTS[:2])
    res = generate(
        student.eval(), batch, DecodeConfig(decoder="onestep", steps=1, block_size=4, max_new_tokens=8)
    )
    assert res.forwards == res.stats["blocks"] and all(1 <= len(t) <= 8 for t in res.tokens)


@pytest.mark.parametrize("guarded", [True, False])
def test_teacher_rollouts_never_hold_a_banned_token(tiny, monkeypatch, guarded):
    """Phase 1 runs the decoders' guard: a teacher biased towards the mask token (then pad and the
    image markers) still commits none of them and records 0 probability for them. Unguarded (the
    guard patched out) the same teacher writes the mask token, so the check can fail."""
    from echocxr.model import denoise
    from echocxr.train import dcd

    _, tok, proc, cfg = tiny
    model = prefer_banned(EchoVLM.from_config(cfg, tok, seed=0).eval())
    s = model.special
    monkeypatch.setattr(dcd, "repetition_loop", lambda body: False)  # keep every rollout
    if not guarded:
        none = lambda m, tokenizer=None: torch.zeros(m.vocab_size, dtype=torch.bool)  # noqa: E731
        monkeypatch.setattr(denoise, "banned_tokens", none)
    rng = np.random.default_rng(6)
    exs = [Example([noise_image(rng)], lang, None, f"s{i}") for i, lang in enumerate(["en", "zh"])]
    dcfg = dcd.DCDConfig(block_size=4, top_k=8, max_new_tokens=8, collect_batch=2)
    rollouts, looped, _ = dcd.decode_share(model, exs, range(2), tok, proc, dcfg)
    assert len(rollouts) == 2 and looped == 0
    banned = denoise.banned_tokens(model, tok) if guarded else None
    written = {t for r in rollouts for t in r.tokens.tolist()}
    if not guarded:
        assert s.mask in written
        return
    assert not any(bool(banned[t]) for t in written)
    for r in rollouts:  # the recorded distributions: a banned id may fill a top-k slot, at p = 0
        hit = banned[r.top_idx.long()]
        assert (r.top_p[hit] == 0).all()


def test_rollout_after_the_first_eos_has_no_target_and_one_eos_term():
    """A hand-built trajectory whose teacher committed content after its own EOS (issue #20): the
    rollout is EOS from there on with no teacher target, so neither the KL nor the EOS term pulls
    against content there, and the EOS term sits on the one real end."""
    from echocxr.model.denoise import StepRecord
    from echocxr.train.dcd import _rollout

    eos, k, B = 2, 3, 4

    def rec(positions, tokens):
        n = len(positions)
        top_idx = torch.tensor([[t, 7, 8] for t in tokens])
        return StepRecord(
            positions, tokens, [0.9] * n, top_idx, torch.full((n, k), 0.3), torch.full((n,), 0.1)
        )

    # block 0 in 2 steps; block 1: EOS at in-block offset 1 committed at step 0, then content
    # (token 9) at offsets 2 and 3 committed after it, at steps 1 and 2
    traj = [
        [rec([0, 1], [5, 6]), rec([2, 3], [7, 8])],
        [rec([0, 1], [4, eos]), rec([2], [9]), rec([3], [9])],
    ]
    tokens = [5, 6, 7, 8, 4, eos]  # cut_at_eos: up to and including the first EOS
    r = _rollout(0, tokens, traj, B, k, eos)
    assert r.tokens.tolist() == [5, 6, 7, 8, 4, eos, eos, eos]
    assert r.end == 5
    assert r.step.tolist() == [0, 0, 1, 1, 0, 0, NO_TARGET, NO_TARGET]
    assert r.block_steps.tolist() == [2, 2, 2, 2, 3, 3, 0, 0]
    assert r.top_idx[5, 0] == eos and (r.top_idx[6:] == 0).all()

    # the loss: changing the student at positions 6-7 changes nothing; the EOS term is position 5's
    V = 12
    g = torch.Generator().manual_seed(0)
    student = torch.randn(1, 8, V, generator=g)
    t = Targets(
        r.tokens[None],
        r.step[None],
        r.top_idx.long()[None],
        r.top_p[None],
        r.rest[None],
        r.block_steps[None],
        torch.arange(8)[None] == r.end,
    )
    loss, logs = dcd_loss(student, t, eos, eos_weight=1.0)
    other = student.clone()
    other[0, 6:] = torch.randn(2, V, generator=g) * 50
    torch.testing.assert_close(dcd_loss(other, t, eos, eos_weight=1.0)[0], loss)
    assert logs["eos_ce"] == pytest.approx(float(-student[0, 5].log_softmax(-1)[eos]), rel=1e-5)


def test_confidence_threshold_order_has_no_window():
    """The paper's confidence order (`confidence_threshold`) takes the scheduled count most
    confident first anywhere in the block; `confidence_dynamic` only among the 2n leftmost."""
    from echocxr.model.denoise import choose

    conf = torch.tensor([[0.3, 0.2, 0.1, 0.05, 0.6, 0.1, 0.1, 0.1]])
    masked = torch.ones(1, 8, dtype=torch.bool)
    paper = choose(conf, masked, 8, "confidence_threshold", 0.85)
    ours = choose(conf, masked, 8, "confidence_dynamic", 0.85)
    assert paper.nonzero()[:, 1].tolist() == [4]
    assert ours.nonzero()[:, 1].tolist() == [0]
    above = torch.tensor([[0.3, 0.9, 0.1, 0.05, 0.95, 0.1, 0.1, 0.1]])
    assert choose(above, masked, 8, "confidence_threshold", 0.85).nonzero()[:, 1].tolist() == [1, 4]


def test_ar_teacher_rollouts_are_left_to_right_blocks_of_its_greedy_decode(tiny):
    """--teacher-decoder ar: the teacher's tokens are its greedy AR decode (the block loop at
    block 1), regrouped into blocks of B with step = offset in the block, and the recorded
    distribution at each position is the teacher's next-token distribution there."""
    from echocxr.model.denoise import CachedContext, banned_tokens, denoise_blocks
    from echocxr.train.dcd import DCDConfig, collect_rollouts

    model, tok, proc, cfg = tiny
    rng = np.random.default_rng(5)
    exs = [Example([noise_image(rng)], "en", None, f"s{i}") for i in range(3)]
    dcfg = DCDConfig(block_size=4, top_k=8, max_new_tokens=20, collect_batch=3, teacher_decoder="ar")
    rollouts, _ = collect_rollouts(model, exs, tok, proc, dcfg)
    batch = collate(
        [Example(e.images, e.language, None, e.record_id) for e in exs], tok, proc, cfg.image_tokens
    )
    banned = banned_tokens(model, tok)
    ref = denoise_blocks(
        model,
        CachedContext(model, batch, 20, 1),
        3,
        block=1,
        steps=1,
        max_new_tokens=20,
        strategy="sequential",
        banned=banned,
    )
    for r in rollouts:
        toks = ref.tokens[r.example]
        assert r.tokens[: len(toks)].tolist() == toks
        last = r.end if r.end >= 0 else len(r.tokens) - 1
        assert r.step[: last + 1].tolist() == [j % 4 for j in range(last + 1)]
        assert r.top_idx[: last + 1, 0].tolist() == toks[: last + 1]  # greedy: the top token
        full = [4] * (last // 4 * 4) + [last % 4 + 1] * (last % 4 + 1)
        assert r.block_steps[: last + 1].tolist() == full
    with pytest.raises(Exception, match="refresh"):
        DCDConfig(teacher_decoder="ar", refresh="student")
