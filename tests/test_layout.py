"""The ECHO sequence layout (model/layout.py): the token shift saved in and checked against
checkpoints, the one padding-aware mask builder against brute-force loops (dense and
FlexAttention), and the import graph (decode/ and eval/ never import train/; DCD never imports
the decoders)."""

import ast
import json
import re
from pathlib import Path

import pytest
import torch

from echocxr.errors import UserError
from echocxr.model import layout, masks

SRC = Path(__file__).resolve().parents[1] / "src" / "echocxr"


# -- the token shift in checkpoints -----------------------------------------------------------------


def test_check_checkpoint_refuses_a_missing_or_different_shift():
    layout.check_checkpoint({layout.SHIFT_KEY: layout.AR_SHIFT}, "ck")  # agrees: no error
    with pytest.raises(UserError, match=r"ck/echocxr.json: no 'token_shift' field"):
        layout.check_checkpoint({"stage": "rad"}, "ck")
    with pytest.raises(UserError, match="trained with token_shift=False"):
        layout.check_checkpoint({layout.SHIFT_KEY: not layout.AR_SHIFT}, "ck")
    with pytest.raises(UserError, match="token_shift='yes'"):  # a string is not the boolean
        layout.check_checkpoint({layout.SHIFT_KEY: "yes"}, "ck")


def test_checkpoint_saves_the_shift_and_loading_checks_it(tmp_path):
    from echocxr.model.config import get_preset
    from echocxr.model.tokenizer import train_bpe
    from echocxr.model.vlm import ECHO_CONFIG, EchoVLM

    tok = train_bpe(["Findings: normal heart. No effusion.", "Impression: normal chest."] * 10, 300)
    model = EchoVLM.from_config(get_preset("tiny"), tok)
    ck = tmp_path / "ck"
    model.save_pretrained(ck, tok, extra={"stage": "rad", "block_size": 4})
    meta = json.loads((ck / ECHO_CONFIG).read_text())
    assert meta[layout.SHIFT_KEY] is layout.AR_SHIFT and meta["block_size"] == 4
    _, _, _, loaded = EchoVLM.from_pretrained(ck)
    assert loaded[layout.SHIFT_KEY] is layout.AR_SHIFT

    meta[layout.SHIFT_KEY] = not layout.AR_SHIFT
    (ck / ECHO_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="cannot decode or train it correctly"):
        EchoVLM.from_pretrained(ck)
    del meta[layout.SHIFT_KEY]  # a checkpoint written before the field existed
    (ck / ECHO_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="no 'token_shift' field") as err:
        EchoVLM.from_pretrained(ck)
    # one line naming the file, the field and value to add and why it is not guessed; doing
    # exactly what it says makes the checkpoint load
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{ck}/echocxr.json: ") and "not guessed" in msg
    fix = re.search(r'add ("token_shift": \w+) to that file', msg)
    assert fix, msg
    (ck / ECHO_CONFIG).write_text(json.dumps({**meta, **json.loads("{" + fix.group(1) + "}")}))
    assert EchoVLM.from_pretrained(ck)[3][layout.SHIFT_KEY] is layout.AR_SHIFT
    (ck / ECHO_CONFIG).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        EchoVLM.from_pretrained(ck)


# -- the one mask builder ---------------------------------------------------------------------------


def brute_padded(rule, valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """[rows, 1, Q, K] by loops: query i is slot K - Q + i; it may attend to key k if the rule
    allows it and k is a valid slot, and always to its own slot."""
    rows, K = valid.shape
    m = torch.zeros(rows, 1, q_len, K, dtype=torch.bool)
    for b in range(rows):
        for i in range(q_len):
            q = K - q_len + i
            for k in range(K):
                allowed = bool(rule(torch.tensor(q), torch.tensor(k)))
                m[b, 0, i, k] = (allowed and bool(valid[b, k])) or q == k
    return m


def _valid(rows: int, K: int, pads: list[int]) -> torch.Tensor:
    v = torch.ones(rows, K, dtype=torch.bool)
    for b, n in enumerate(pads):
        v[b, :n] = False  # left padding
    return v


@pytest.mark.parametrize(
    ("rule", "K", "q_len"),
    [
        (masks.causal, 11, None),
        (masks.rad_rule(5, 8, 4), 21, None),
        (masks.decode_rule(7, 4), 15, 8),  # fused one-step: [prev clean | mask block]
        (masks.decode_rule(9, 1), 10, 1),  # the AR step
        (lambda q, k: masks.prompt_then_blocks(q, k, prefix=5, block=3), 14, None),
    ],
)
def test_attention_mask_matches_brute_force(rule, K, q_len):
    valid = _valid(3, K, [0, 2, 4])
    Q = K if q_len is None else q_len
    want = brute_padded(rule, valid, Q)
    assert torch.equal(layout.attention_mask(rule, valid, q_len), want)
    # an evaluated [Q, K] rule tensor gives the same mask
    evaluated = masks.dense(rule, Q, K, q_offset=K - Q)
    assert torch.equal(layout.attention_mask(evaluated, valid, q_len), want)


def test_flex_attention_mask_matches_dense():
    pytest.importorskip("torch.nn.attention.flex_attention")
    P, R, B = 6, 8, 4
    S = P + 2 * R
    valid = _valid(2, S, [0, 3])
    rule = masks.rad_rule(P, R, B)
    bm = layout.attention_mask(rule, valid, flex=True)
    dense = layout.attention_mask(rule, valid)
    q = torch.arange(S)[:, None]
    k = torch.arange(S)[None, :]
    for b in range(2):
        assert torch.equal(bm.mask_mod(torch.tensor(b), 0, q, k).expand(S, S), dense[b, 0])


def test_decode_mask_is_the_block_decoding_rule_with_padding():
    valid = _valid(2, 20, [0, 3])
    got = layout.decode_mask(valid, 9, 8, 4)
    assert got.shape == (2, 1, 8, 17)
    assert torch.equal(got, brute_padded(masks.decode_rule(9, 4), valid[:, :17], 8))
    # every new query sees each valid committed slot; a padded slot only from itself
    assert bool(got[1, 0, :, 3:9].all()) and not bool(got[1, 0, :, :3].any())


def test_prompt_then_blocks_matches_brute_force():
    P, B, S = 4, 3, 13
    for q in range(S):
        for k in range(S):
            if k < P:
                want = q >= k  # the prompt: causal, and every response token sees it
            else:
                want = q >= P and (q - P) // B >= (k - P) // B
            assert bool(masks.prompt_then_blocks(torch.tensor(q), torch.tensor(k), prefix=P, block=B)) == want


def test_response_positions_continue_each_prompt():
    pos_prompt = torch.tensor([[[0, 1, 2, 5], [0, 0, 1, 2]]]).expand(3, 2, 4)
    got = layout.response_positions(pos_prompt, 3)
    assert got.shape == (3, 2, 3)
    assert got[0].tolist() == [[6, 7, 8], [3, 4, 5]]
    assert torch.equal(got, layout.text_positions(torch.tensor([6, 3]), 0, 3))


# -- the import graph -------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("decode", "echocxr.train"),
        ("eval", "echocxr.train"),
        ("model", "echocxr.train"),
        ("model", "echocxr.decode"),
    ],
)
def test_no_import_runs_back_up_the_data_flow(folder, forbidden):
    files = sorted((SRC / folder).rglob("*.py"))
    assert files
    bad = [f"{f.relative_to(SRC)}: {m}" for f in files for m in _imports(f) if m.startswith(forbidden)]
    assert not bad, bad


def test_training_stages_do_not_import_the_decoders():
    bad = [
        f"{f.name}: {m}"
        for f in sorted((SRC / "train").glob("*.py"))
        for m in _imports(f)
        if m.startswith("echocxr.decode")
    ]
    assert not bad, bad
