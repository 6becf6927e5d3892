"""RAD (Stage 2): the layout, the noise, the loss on a hand-built batch, and that training and
decoding read the same slots (clean copy == plain block-causal pass; noisy block == the block
decoder's cached denoising forward)."""

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from echocxr.batch import Example, collate
from echocxr.model.config import get_preset
from echocxr.model.denoise import CachedContext
from echocxr.model.image_processing import make_image_processor
from echocxr.model.layout import logits_for_block
from echocxr.model.masks import block_causal
from echocxr.model.tokenizer import train_bpe
from echocxr.model.vlm import EchoVLM
from echocxr.train import rad
from helpers import REPORTS as TEXTS
from helpers import noise_image

B = 4


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    tok = train_bpe(TEXTS, 400)
    cfg = get_preset("tiny")
    model = EchoVLM.from_config(cfg, tok, seed=0, dtype=torch.float64)
    proc = make_image_processor(cfg.image_size)
    rng = np.random.default_rng(0)
    img = lambda: noise_image(rng)  # noqa: E731
    exs = [
        Example([img()], "en", "Findings: No pleural effusion.\nImpression: Normal chest."),
        Example([img(), img()], "zh", "所见：无气胸。\n印象：胸部未见异常。心影大小正常。"),
    ]
    batch = collate(exs, tok, proc, cfg.image_tokens, multiple_of=B)
    return model, tok, proc, cfg, batch


def test_batch_is_eos_padded_to_blocks(tiny):
    model, *_, batch = tiny
    R = batch.response_ids.shape[1]
    assert R % B == 0
    short = int(batch.response_len.argmin())
    assert int(batch.response_len[short]) < R  # one row has EOS padding, which RAD supervises
    assert bool((batch.response_ids[short, batch.response_len[short] - 1 :] == model.special.eos).all())


def test_noise_per_block():
    g = torch.Generator().manual_seed(0)
    noise = rad.sample_noise(64, 5 * B, B, g)
    counts = noise.masked.view(64, 5, B).sum(-1)
    assert torch.equal(counts.float() / B, noise.t)
    assert int(counts.min()) == 1 and int(counts.max()) == B  # n ~ Uniform{1..B}: both ends occur
    # every count is about equally frequent (16 draws each expected out of 320)
    freq = torch.bincount(counts.flatten(), minlength=B + 1)[1:]
    assert int(freq.min()) > 40 and int(freq.max()) < 120
    # the masked positions inside a block are spread over all offsets
    assert bool(noise.masked.view(64, 5, B).any(0).any(0).all())


def test_response_logit_index():
    P, R = 10, 8
    idx = rad.response_logit_index(P, R, B, shift=True).tolist()
    # block 0: token 0 from the prompt's last slot, tokens 1..3 from noisy slots 0..2
    assert idx[:4] == [P - 1, P, P + 1, P + 2]
    # block 1: token 4 from the clean copy of token 3, tokens 5..7 from noisy slots 4..6
    assert idx[4:] == [P + R + 3, P + 4, P + 5, P + 6]
    assert rad.response_logit_index(P, R, B, shift=False).tolist() == list(range(P, P + R))


def _rad_hidden(model, batch, x_t):
    x, pos, mask = rad.rad_inputs(model, batch, x_t, freeze_vision=True, block=B)
    return model(x, pos, mask)


def test_clean_copy_equals_plain_block_causal_pass(tiny):
    """The clean half of the RAD layout computes exactly what [prefix | clean] alone computes with a
    block-causal response: the noisy copy never leaks into it."""
    model, *_, batch = tiny
    x0 = batch.response_ids
    rows, P = batch.prompt_ids.shape
    R = x0.shape[1]
    g = torch.Generator().manual_seed(1)
    x_t = torch.where(rad.sample_noise(rows, R, B, g).masked, model.special.mask, x0)
    with torch.no_grad():
        h_rad = _rad_hidden(model, batch, x_t)
        x = torch.cat([model.embed(batch.prompt_ids, batch.pixel_values, batch.grid_thw), model.embed(x0)], 1)
        pos_p = model.positions(batch.prompt_ids, batch.grid_thw, valid=batch.prompt_valid)
        pos_r = pos_p.amax(dim=(0, 2))[:, None] + 1 + torch.arange(R)[None]
        pos = torch.cat([pos_p, pos_r[None].expand(3, -1, -1)], 2)
        S = P + R
        q, k = torch.arange(S)[:, None], torch.arange(S)[None]
        rule = ((k < P) & (q >= k)) | ((k >= P) & (q >= P) & block_causal(q, k, block=B, offset=P))
        valid = torch.cat([batch.prompt_valid, torch.ones(rows, R, dtype=torch.bool)], 1)
        mask = (rule[None] & valid[:, None]) | torch.eye(S, dtype=torch.bool)
        h_plain = model(x, pos, mask[:, None])
    lr, lp = model.logits(h_rad), model.logits(h_plain)
    keep = batch.prompt_valid
    torch.testing.assert_close(lr[:, :P][keep], lp[:, :P][keep], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lr[:, P + R :], lp[:, P:], rtol=1e-9, atol=1e-9)
    # and the noisy half does differ from the clean one (the test compares something real)
    assert not torch.allclose(lr[:, P : P + R], lr[:, P + R :])


@pytest.mark.parametrize("shift", [True, False])
def test_noisy_block_logits_equal_the_decoders(tiny, shift):
    """For every block i, the logits RAD trains on (noisy block i of the layout, read through
    response_logit_index) equal what the block decoder computes when it denoises block i with the
    same partially masked tokens after committing the clean blocks before it."""
    model, *_, batch = tiny
    x0 = batch.response_ids
    rows, P = batch.prompt_ids.shape
    R = x0.shape[1]
    g = torch.Generator().manual_seed(2)
    masked = rad.sample_noise(rows, R, B, g).masked
    x_t = torch.where(masked, model.special.mask, x0)
    with torch.no_grad():
        h = _rad_hidden(model, batch, x_t)
        train_logits = model.logits(h[:, rad.response_logit_index(P, R, B, shift)]).float()
        ctx = CachedContext(model, batch, R, B)
        for i in range(R // B):
            blk = slice(i * B, (i + 1) * B)
            h_blk, first = ctx.denoise(x_t[:, blk])
            dec_logits = logits_for_block(model, h_blk, first, shift)
            torch.testing.assert_close(dec_logits, train_logits[:, blk], rtol=1e-7, atol=1e-7)
            ctx.commit(x0[:, blk])


def test_loss_is_the_weighted_masked_ce(tiny):
    """rad_loss against the objective written out by hand on the same forward."""
    model, *_, batch = tiny
    x0 = batch.response_ids
    rows, P = batch.prompt_ids.shape
    R = x0.shape[1]
    noise = rad.sample_noise(rows, R, B, torch.Generator().manual_seed(3))
    loss, logs = rad.rad_loss(model, batch, noise, block=B)
    with torch.no_grad():
        x_t = torch.where(noise.masked, model.special.mask, x0)
        logits = model.logits(_rad_hidden(model, batch, x_t))
        total = 0.0
        for r in range(rows):
            for t in range(R):
                if not noise.masked[r, t]:
                    continue
                slot = (P + R + t - 1 if t else P - 1) if t % B == 0 else P + t - 1
                ce = -torch.log_softmax(logits[r, slot], -1)[x0[r, t]]
                total += float(ce) / float(noise.t[r, t // B])
    assert loss.item() == pytest.approx(total / (rows * R), rel=1e-9)
    assert logs["mask_ratio"] == pytest.approx(noise.masked.float().mean().item())
    assert np.isfinite(logs["eos_ce"])  # EOS (incl. padding) positions are supervised


def test_fully_masked_loss_is_mean_ce(tiny):
    """At t = 1 in every block the weight is 1: the loss is the plain mean CE over all R tokens."""
    model, *_, batch = tiny
    rows, R = batch.response_ids.shape
    noise = rad.Noise(torch.ones(rows, R, dtype=torch.bool), torch.ones(rows, R // B))
    loss, logs = rad.rad_loss(model, batch, noise, block=B)
    assert loss.item() == pytest.approx(logs["masked_ce"], rel=1e-9)


@pytest.mark.filterwarnings("ignore")  # eager FlexAttention warns that it is unfused
def test_flex_attention_loss_equals_dense(tiny):
    """The GPU path's FlexAttention mask (rule + per-row key padding) gives the dense path's loss.
    FlexAttention has no CPU backward, so this checks the forward."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    model, *_, batch = tiny
    rows, R = batch.response_ids.shape
    noise = rad.sample_noise(rows, R, B, torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense, _ = rad.rad_loss(model, batch, noise, block=B)
        flex, _ = rad.rad_loss(model, batch, noise, block=B, flex=True)
    assert flex.item() == pytest.approx(dense.item(), rel=1e-9)


def test_stage_freezes_vision_and_learns(tiny):
    """A few AdamW steps of the stage on one batch lower its loss; the vision tower stays fixed."""
    _, tok, proc, cfg, batch = tiny
    model = EchoVLM.from_config(cfg, tok, seed=1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    rad.add_stage_arguments(parser)
    args = parser.parse_args(["--block-size", str(B)])
    stage = rad.build_stage(args, model, tok, proc)
    assert stage.name == "rad" and stage.multiple_of == B and stage.freeze_vision
    assert not any(p.requires_grad for p in model.visual.parameters())
    vision_before = [p.detach().clone() for p in model.visual.parameters()]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch32 = batch.to("cpu")
    losses = []
    for step in range(12):
        loss, logs = stage.loss(model, batch32, step % 2)  # two fixed noise draws
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["loss"])
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2])
    for p, before in zip(model.visual.parameters(), vision_before, strict=True):
        assert torch.equal(p, before)
    # the same step draws the same noise (a resumed run repeats it)
    l1, _ = stage.loss(model, batch32, 5)
    l2, _ = stage.loss(model, batch32, 5)
    assert l1.item() == l2.item()
    # resuming with another block size is a user error
    from echocxr.errors import UserError

    other = rad.RADStage(rad.RADConfig(block_size=8))
    with pytest.raises(UserError, match="block size"):
        other.load_state_dict(stage.state_dict())


def test_cross_entropy_reference_matches_torch():
    # guards the hand-written objective above: log_softmax picks the same number as F.cross_entropy
    logits = torch.randn(3, 11, dtype=torch.float64)
    y = torch.tensor([1, 5, 10])
    want = F.cross_entropy(logits, y, reduction="none")
    got = torch.stack([-torch.log_softmax(logits[i], -1)[y[i]] for i in range(3)])
    torch.testing.assert_close(got, want)


# -- echocxr bench rad -----------------------------------------------------------------------------


def test_bench_counts_match_closed_forms():
    from echocxr.bench.rad_flops import attention_pairs, layouts

    V, R, Bk = 37, 24, 8
    lay_rad, lay_sym = layouts(V, R, Bk)
    assert lay_rad.seq == V + 2 * R and lay_sym.seq == 2 * (V + R)
    nb = R // Bk
    want = (
        V * (V + 1) // 2  # causal prefix
        + 2 * R * V  # both response copies see the whole prefix
        + nb * Bk * Bk  # noisy blocks, bidirectional
        + sum(Bk * i * Bk for i in range(nb))  # noisy block i -> clean blocks < i
        + sum(Bk * (i + 1) * Bk for i in range(nb))  # clean block i -> clean blocks <= i
    )
    pairs = attention_pairs(lay_rad.mask(), tile=16)
    assert pairs["exact"] == want
    assert pairs["dense"] == lay_rad.seq**2
    n_tiles = -(-lay_rad.seq // 16)
    assert pairs["exact"] <= pairs["tiles"] < n_tiles * n_tiles * 256  # some tiles are skipped


def test_bench_cli_runs_on_tiny(tmp_path, capsys):
    import json

    from echocxr.bench import rad_flops

    parser = argparse.ArgumentParser()
    rad_flops.add_arguments(parser)
    out = tmp_path / "rad.jsonl"
    args = parser.parse_args(
        "--preset tiny --vision 24,40 --response 16 --block-size 4 --steps 1 --warmup 0".split()
        + ["--append", str(out)]
    )
    assert rad_flops.run(args) == 0
    lines = [json.loads(s) for s in out.read_text().splitlines()]
    assert [r["V"] for r in lines] == [24, 40]
    for r in lines:
        V, R = r["V"], r["R"]
        assert r["flop_ratio_linear"] == pytest.approx(2 * (V + R) / (V + 2 * R))
        assert r["step_s"]["rad"] > 0 and r["step_s"]["symmetric"] > 0 and r["step_s"]["duplicated"] > 0
        assert r["duplicated"]["linear"] == r["symmetric"]["linear"]  # the same length 2(V + R)
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


# -- echocxr train --stage rad ---------------------------------------------------------------------


def _corpus(tmp_path):
    from echocxr.data.records import Record, write_jsonl

    recs = []
    for i, text in enumerate(TEXTS[:3] * 2):
        findings, _, impression = text.replace("所见：", "Findings: ").partition("\nImpression: ")
        recs.append(
            Record(
                f"iu:{i}",
                f"iu:{i}",
                "iu",
                "train",
                "en",
                findings=findings.removeprefix("Findings: "),
                impression=impression or "Normal chest.",
            )
        )
    write_jsonl(tmp_path / "corpus.jsonl", recs)
    return tmp_path / "corpus.jsonl"


def test_echocxr_train_stage_rad_cli(tiny, tmp_path):
    """`echocxr train --stage rad` through the shared training CLI, from a tiny Stage-1 checkpoint
    saved here; the final checkpoint decodes with the block decoder."""
    from echocxr.cli import main
    from echocxr.decode.api import DecodeConfig, generate

    _, tok, proc, cfg, _ = tiny
    stage1 = EchoVLM.from_config(cfg, tok, seed=2)
    stage1.save_pretrained(tmp_path / "ar", tok, proc, extra={"stage": "ar"})
    out = tmp_path / "rad"
    argv = ["train", "--stage", "rad", "--init", str(tmp_path / "ar"), "--corpus", str(_corpus(tmp_path))]
    argv += ["--out", str(out), "--steps", "3", "--batch-size", "2", "--device", "cpu", "--seed", "0"]
    argv += ["--log-every", "1", "--block-size", str(B), "--image-source", "phantom"]
    assert main(argv) == 0
    model, tok2, proc2, _ = EchoVLM.from_pretrained(out / "final")
    # the vision tower was frozen: its weights are the Stage-1 ones
    for a, b in zip(model.visual.parameters(), stage1.visual.parameters(), strict=True):
        assert torch.equal(a.to(b.dtype), b)
    rng = np.random.default_rng(5)
    img = noise_image(rng)
    batch = collate([Example([img], "en")], tok2, proc2, cfg.image_tokens)
    dc = DecodeConfig(decoder="block", block_size=B, steps=2, max_new_tokens=8, strategy="confidence_static")
    res = generate(model.eval(), batch, dc)
    assert 1 <= len(res.tokens[0]) <= 8


def test_full_duplication_layout_gives_rads_loss_and_gradient(tiny):
    """The full-duplication ablation (prompt twice, `masks.duplicated`) trains the same objective:
    equal loss and equal gradients (float64), on a longer sequence."""
    model, *_, batch = tiny
    rows, R = batch.response_ids.shape
    noise = rad.sample_noise(rows, R, B, torch.Generator().manual_seed(5))
    grads = {}
    for layout in ("rad", "duplicated"):
        model.zero_grad(set_to_none=True)
        loss, _ = rad.rad_loss(model, batch, noise, block=B, layout=layout)
        loss.backward()
        grads[layout] = (loss.item(), [p.grad.clone() for p in model.lm.parameters() if p.grad is not None])
    assert grads["duplicated"][0] == pytest.approx(grads["rad"][0], rel=1e-10)
    for a, b in zip(grads["rad"][1], grads["duplicated"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    model.zero_grad(set_to_none=True)
    with pytest.raises(Exception, match="--layout"):
        rad.RADConfig(layout="symmetric-ish")
