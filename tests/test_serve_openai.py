"""The server's OpenAI contract (issue #22 items 1-8), against the official `openai` client and
httpx: `n`, `stop`, `seed`, validation as the OpenAI API does it, OpenAI's error layout for every
error, which user turn's images are the study, data: URIs, request bodies, and a client that goes
away mid-stream. Each example of the issue is a case here.

The tiny random-weight checkpoint of tests/test_serve.py (stage dcd, onestep, block 4); one server
per module. A request "alone" is the same request sent when nothing else is queued.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from dataclasses import replace

import httpx
import pytest
import torch
from openai import BadRequestError, NotFoundError, OpenAI

from echocxr.serve.app import Detokenizer, create_app
from echocxr.serve.backend import ReportBackend
from echocxr.serve.background import BackgroundServer
from echocxr.serve.batcher import Batcher, Done, Failed, Job
from echocxr.serve.config import Limits, ServeConfig
from echocxr.serve.schemas import EXTENSIONS, IGNORED, REFUSED, SUPPORTED
from test_serve import LIMITS, build_ckpt, chat_body

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    torch.set_num_threads(1)
    return ReportBackend(build_ckpt(tmp_path_factory.mktemp("serve_openai") / "dcd"), device="cpu")


@pytest.fixture(scope="module")
def server(backend):
    app = create_app(backend, ServeConfig(max_batch=8, max_wait_ms=30, limits=LIMITS))
    with BackgroundServer(app) as url:
        yield url


@pytest.fixture(scope="module")
def png(iu_images):
    return sorted(iu_images.glob("*.png"))[0].read_bytes()


@pytest.fixture(scope="module")
def pngs(iu_images):
    return [p.read_bytes() for p in sorted(iu_images.glob("*.png"))]


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(server, body, **kw):
    return httpx.post(server + CHAT, json=body, timeout=60, **kw)


def stream_chunks(server, body) -> list[dict]:
    """The JSON chunks of a streamed chat completion (without the final [DONE])."""
    with httpx.stream("POST", server + CHAT, json={**body, "stream": True}, timeout=60) as s:
        assert s.status_code == 200, s.read()
        events = [e for e in s.read().decode().split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


def streamed_choices(chunks) -> dict[int, tuple[str, list]]:
    """index -> (the concatenated content, its finish reasons) of streamed chunks."""
    out: dict[int, tuple[str, list]] = {}
    for c in chunks:
        for ch in c["choices"]:
            text, fins = out.setdefault(ch["index"], ("", []))
            out[ch["index"]] = (text + (ch["delta"].get("content") or ""), fins)
            if ch["finish_reason"]:
                fins.append(ch["finish_reason"])
    return out


def assert_error_layout(r, status: int, param, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["code"], str) and err["param"] == param, err
    assert "\n" not in err["message"] and "Traceback" not in r.text
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if code is not None:
        assert err["code"] == code, err
    return err


# ----------------------------------------------------------------------------------- 1. n


def test_n_choices_are_separate_rows_with_their_own_index_and_finish(server, client, png):
    body = chat_body(png, max_tokens=12, temperature=0)
    one = post(server, body).json()
    r = client.chat.completions.create(model="echocxr", messages=body["messages"], max_tokens=12, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    want = one["choices"][0]["message"]["content"]
    assert all(c.message.content == want and c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage.completion_tokens == 3 * one["usage"]["completion_tokens"]
    assert r.usage.prompt_tokens == one["usage"]["prompt_tokens"]  # the prompt counts once
    assert r.model_extra["echocxr"]["batch_size"] >= 2  # the choices shared a batch

    chunks = stream_chunks(server, {**body, "n": 2})
    got = streamed_choices(chunks)
    assert sorted(got) == [0, 1]
    assert all(text == want and fins == [one["choices"][0]["finish_reason"]] for text, fins in got.values())

    sampled = {**body, "temperature": 1.0, "seed": 5}
    both = post(server, {**sampled, "n": 2}).json()["choices"]
    first = post(server, sampled).json()["choices"][0]["message"]["content"]
    second = post(server, {**sampled, "seed": 6}).json()["choices"][0]["message"]["content"]
    assert [c["message"]["content"] for c in both] == [first, second]  # choice i: seed + i
    assert first != second


@pytest.mark.parametrize("n", [0, 129, -1, 2.5, "2", True])
def test_n_out_of_range_or_not_an_integer_is_a_400_naming_n(server, client, png, n):
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="echocxr", messages=chat_body(png)["messages"], n=n)
    assert e.value.param == "n" and isinstance(e.value.code, str) and "n" in e.value.message


# ----------------------------------------------------------------------------------- 2. stop


def test_stop_returns_the_text_before_the_phrase_in_both_modes(server, png):
    body = chat_body(png, max_tokens=40, temperature=0)
    full = post(server, body).json()["choices"][0]["message"]["content"]
    blocks = [c["choices"][0]["delta"].get("content") or "" for c in stream_chunks(server, body)][1:]
    # a phrase across the boundary of two committed blocks, first found at that boundary
    bounds = [sum(len(b) for b in blocks[: k + 1]) for k in range(len(blocks) - 1)]
    straddling = [
        full[b - 2 : b + 3]
        for b in bounds
        if 2 <= b <= len(full) - 3 and full.find(full[b - 2 : b + 3]) == b - 2
    ]
    assert straddling, (full, bounds)
    later = full[len(full) // 2 : len(full) // 2 + 4]
    for stop in (straddling[0], [later], ["never in it \u2603", straddling[-1]], [later, straddling[0]]):
        phrases = [stop] if isinstance(stop, str) else stop
        cut = min(full.find(p) for p in phrases if p in full)
        r = post(server, {**body, "stop": stop}).json()
        assert r["choices"][0]["message"]["content"] == full[:cut], stop
        assert r["choices"][0]["finish_reason"] == "stop"
        streamed = streamed_choices(stream_chunks(server, {**body, "stop": stop}))
        assert streamed == {0: (full[:cut], ["stop"])}, stop
        assert r["usage"]["completion_tokens"] <= post(server, body).json()["usage"]["completion_tokens"]
    r = post(server, {**body, "stop": "never in it \u2603"}).json()
    assert r["choices"][0]["message"]["content"] == full


def test_detokenizer_cut_is_the_same_for_every_split():
    """Code points as token ids: any split of a text into pieces gives the one-shot cut, for phrases
    that overlap each other, repeat, or only start at the end."""
    import random

    class Chars:
        text = staticmethod(lambda ids: "".join(map(chr, ids)))

    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abcx. ") for _ in range(rng.randint(0, 30)))
        stops = [
            "".join(rng.choice("abcx. ") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))
        ]
        ids = [ord(c) for c in text]
        whole = Detokenizer(Chars, stops)
        once = whole.add(ids, final=True)
        hits = [text.find(p) for p in stops if p in text]
        assert once == text[: min(hits)] if hits else once == text
        d, pieces, i = Detokenizer(Chars, stops), [], 0
        while i < len(ids):
            k = rng.randint(1, 5)
            pieces.append(d.add(ids[i : i + k]))
            i += k
        pieces.append(d.add([], final=True))
        assert "".join(pieces) == once and d.stopped == whole.stopped, (text, stops, pieces)
        assert d.tokens_used() == whole.tokens_used() <= len(ids)


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], "", [""], 3, [1]])
def test_bad_stop_is_a_400_naming_stop(server, png, stop):
    assert_error_layout(post(server, chat_body(png, stop=stop)), 400, "stop")


# ----------------------------------------------------------------------------------- 3. seed


def test_seed_range_is_checked_and_a_bad_seed_never_takes_its_batch_down(server, png):
    good = chat_body(png, max_tokens=8, temperature=0.7, seed=3)
    results = {}

    def send(key, body):
        results[key] = post(server, body)

    threads = [
        threading.Thread(target=send, args=(k, {**good, "seed": s})) for k, s in (("big", 2**64), ("ok", 3))
    ]
    threads += [threading.Thread(target=send, args=("small", {**good, "seed": -(2**63) - 1}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in ("big", "small"):
        assert_error_layout(results[k], 400, "seed")
    assert results["ok"].status_code == 200
    for s in (-1, 0, 2**63 - 1, -(2**63)):  # OpenAI's range: any 64-bit signed integer
        r = post(server, {**good, "seed": s})
        assert r.status_code == 200, (s, r.text)
        assert r.json()["echocxr"]["seed"] == s


def test_a_seeded_request_gives_the_same_text_alone_and_in_any_batch(server, pngs):
    body = chat_body(pngs[0], max_tokens=16, temperature=1.0, seed=1234)
    alone = post(server, body).json()
    assert alone["echocxr"]["batch_size"] == 1

    async def crowd():
        async with httpx.AsyncClient(base_url=server, timeout=60) as c:
            bodies = [body] * 3 + [chat_body(p, max_tokens=16, temperature=1.0) for p in pngs]
            return await asyncio.gather(*(c.post(CHAT, json=b) for b in bodies))

    out = [r.json() for r in asyncio.run(crowd())]
    assert max(o["echocxr"]["batch_size"] for o in out[:3]) > 1  # they did share batches
    for o in out[:3]:
        assert o["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]


def test_unseeded_sampling_is_random(server, png):
    body = chat_body(png, max_tokens=16, temperature=1.0)
    texts = {post(server, body).json()["choices"][0]["message"]["content"] for _ in range(4)}
    assert len(texts) > 1
    seeds = {post(server, body).json()["echocxr"]["seed"] for _ in range(3)}
    assert len(seeds) == 3  # each unseeded request draws its own seed (reported, to replay it)


def test_a_batch_that_fails_is_retried_row_by_row_so_one_bad_row_fails_alone(backend, png):
    """A backend that fails on any batch holding the poisoned row: its batch-mates still get their
    reports, and only the poisoned job hears the error."""
    from echocxr.serve.images import decode_upload

    img = decode_upload(png, "x", max_side=4096)
    poisoned = backend.example([img], "en")

    class Fussy:
        def decode(self, examples, cfg, caps, on_event, seeds=None):
            if any(e is poisoned for e in examples):
                raise RuntimeError("this row cannot be decoded")
            return backend.decode(examples, cfg, caps, on_event, seeds=seeds)

    got: dict[int, list] = {}
    batcher = Batcher(Fussy(), max_batch=4, max_wait_ms=10_000, max_queue=8)
    examples = [backend.example([img], "en"), poisoned, backend.example([img], "en")]
    for i, ex in enumerate(examples):
        cfg = replace(backend.cfg, max_new_tokens=4)
        batcher.submit(Job(ex, cfg, lambda ev, i=i: got.setdefault(i, []).append(ev)))
    batcher.start()
    batcher.close(drain=True)
    assert isinstance(got[1][-1], Failed) and "cannot be decoded" in got[1][-1].message
    assert all(isinstance(got[i][-1], Done) for i in (0, 2))


# ----------------------------------------------------------------------------------- 4. validation


def test_openai_validation_rules(server, png):
    base = chat_body(png, max_tokens=4)
    cases = [
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"stream": "true"}, "stream"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": "4"}, "max_tokens"),
        ({"not_an_openai_parameter": 1}, "not_an_openai_parameter"),
        ({"top_logprobs": 21}, "top_logprobs"),
    ]
    for extra, param in cases:
        assert_error_layout(post(server, {**base, **extra}), 400, param)


NOT_DEFAULT = {
    "frequency_penalty": 0.5,
    "presence_penalty": -1,
    "logit_bias": {"50": 10},
    "logprobs": True,
    "top_logprobs": 2,
    "store": True,
    "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "functions": [{"name": "f"}],
    "tool_choice": "auto",
    "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "high",
    "verbosity": "low",
    "service_tier": "flex",
    "web_search_options": {},
    "moderation": {"model": "omni-moderation-latest"},
}
DEFAULTS = {
    "frequency_penalty": 0,
    "presence_penalty": 0.0,
    "logit_bias": {},
    "logprobs": False,
    "top_logprobs": None,
    "store": False,
    "response_format": {"type": "text"},
    "tools": [],
    "tool_choice": "none",
    "modalities": ["text"],
    "service_tier": "auto",
    "n": 1,
    "stop": None,
    "user": "u-1",
    "safety_identifier": "s",
    "prompt_cache_key": "k",
    "metadata": {"study": "x"},
    "parallel_tool_calls": True,
}


def test_unimplemented_parameters_are_refused_by_name_unless_they_ask_for_nothing(server, client, png):
    assert set(NOT_DEFAULT) == set(REFUSED)
    base = chat_body(png, max_tokens=4)
    for name, value in NOT_DEFAULT.items():
        err = assert_error_layout(post(server, {**base, name: value}), 400, name, "unsupported_parameter")
        assert name in err["message"]
    r = post(server, {**base, **DEFAULTS})
    assert r.status_code == 200, r.text
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="echocxr", messages=base["messages"], logprobs=True)
    assert e.value.param == "logprobs" and e.value.code == "unsupported_parameter"


def test_every_openai_parameter_is_classified_and_documented():
    from openai.types.chat.completion_create_params import CompletionCreateParamsBase

    from echocxr.serve.schemas import ChatRequest

    openai_params = set(CompletionCreateParamsBase.__annotations__) | {"stream"}
    classes = [set(SUPPORTED), set(IGNORED), set(REFUSED)]
    assert set.union(*classes) == openai_params
    assert sum(map(len, classes)) == len(openai_params)  # each in exactly one class
    assert set(ChatRequest.model_fields) == openai_params | set(EXTENSIONS)
    from conftest import REPO

    doc = (REPO / "docs" / "SERVE.md").read_text()
    for p in openai_params | set(EXTENSIONS):
        assert f"`{p}`" in doc, p


# ----------------------------------------------------------------------------------- 5. errors


def test_openai_client_reads_every_error(server, client, png):
    messages = chat_body(png)["messages"]
    with pytest.raises(NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=messages)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    assert e.value.type == "invalid_request_error" and "gpt-4o" in e.value.message
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="echocxr", messages=messages, max_tokens=10_000)
    assert e.value.param == "max_tokens" and isinstance(e.value.code, str)
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="echocxr", messages=messages, extra_body={"decoder": "beam"})
    assert e.value.param == "decoder"
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="echocxr", messages=[{"role": "user", "content": "hi"}])
    assert e.value.param == "messages" and "no image" in e.value.message


def test_every_kind_of_error_has_the_openai_layout(server, png):
    with httpx.Client(base_url=server, timeout=60) as c:
        assert_error_layout(
            c.post(CHAT, json={**chat_body(png), "model": "x"}), 404, "model", "model_not_found"
        )
        assert_error_layout(
            c.post(CHAT, json={"model": "echocxr"}), 400, "messages", "missing_required_parameter"
        )
        assert_error_layout(
            c.post(CHAT, content=b"{", headers={"content-type": "application/json"}), 400, None
        )
        assert_error_layout(
            c.post(CHAT, content=b"[]", headers={"content-type": "application/json"}), 400, None
        )
        assert_error_layout(c.post(CHAT, content=b"{}", headers={"content-type": "text/plain"}), 415, None)
        big = b"x" * (LIMITS.max_body_bytes + 1)
        assert_error_layout(
            c.post(CHAT, content=big, headers={"content-type": "application/json"}), 413, None
        )
        assert_error_layout(c.get("/nope"), 404, None, "not_found")
        assert_error_layout(c.get(CHAT), 405, None)
        bad = chat_body(b"not an image")
        err = assert_error_layout(c.post(CHAT, json=bad), 400, "messages[0].content[1].image_url.url")
        assert err["message"].startswith("image 1: ")
        files = {"frontal": ("a.png", png[:100], "image/png")}
        assert_error_layout(c.post("/v1/reports", files=files), 400, "frontal")
        assert_error_layout(
            c.post("/v1/reports", files={"frontal": ("a.png", png)}, data={"language": "fr"}), 400, "language"
        )
        assert_error_layout(
            c.post("/v1/reports?stream=maybe", files={"frontal": ("a.png", png)}), 400, "stream"
        )


def test_an_unexpected_exception_is_a_500_in_the_layout(backend, png):
    class Broken(SlowBackend):
        def example(self, images, language):
            raise RuntimeError("a bug\nwith two lines")

    app = create_app(Broken(backend), ServeConfig(limits=LIMITS))
    with BackgroundServer(app) as url:
        err = assert_error_layout(post(url, chat_body(png)), 500, None, "internal_error")
        assert err["message"] == "internal error: RuntimeError: a bug"
        assert post(url, {"model": "x"}).status_code == 400  # and it goes on


# ----------------------------------------------------------------------------------- 6. messages


def test_only_the_last_user_turns_images_are_the_study(server, pngs):
    a, b = pngs[0], pngs[1]
    alone_b = post(server, chat_body(b, max_tokens=12)).json()
    turns = chat_body(a)["messages"] + [{"role": "assistant", "content": "Findings: ..."}]
    r = post(server, {**chat_body(b, max_tokens=12), "messages": turns + chat_body(b)["messages"]}).json()
    assert r["choices"][0]["message"]["content"] == alone_b["choices"][0]["message"]["content"]
    assert r["usage"]["prompt_tokens"] == alone_b["usage"]["prompt_tokens"]  # one view, not two
    follow_up = turns + [{"role": "user", "content": [{"type": "text", "text": "and in Chinese?"}]}]
    err = assert_error_layout(
        post(server, {"model": "echocxr", "messages": follow_up}), 400, "messages[2].content"
    )
    assert "earlier turns are not used" in err["message"]


def test_data_uri_scheme_and_parameters_are_case_insensitive(server, png):
    want = post(server, chat_body(png, max_tokens=6)).json()["choices"][0]["message"]["content"]
    b64 = base64.b64encode(png).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))  # MIME line breaks
    for url in (
        "DATA:IMAGE/PNG;BASE64," + b64,
        "Data:image/png;Base64," + b64,
        "data:image/png;name=study.png;charset=binary;base64," + b64,
        "data:application/octet-stream;base64," + wrapped,
        " data:;base64," + b64,
    ):
        body = chat_body(png, max_tokens=6)
        body["messages"][0]["content"][1]["image_url"]["url"] = url
        r = post(server, body)
        assert r.status_code == 200, (url[:40], r.text)
        assert r.json()["choices"][0]["message"]["content"] == want
    body["messages"][0]["content"][1]["image_url"]["url"] = "data:image/png;base64x," + b64
    assert_error_layout(post(server, body), 400, "messages[0].content[1].image_url.url")


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
        {"type": "image", "source": {"type": "base64", "data": "AAAA"}},
        {"type": "file", "file": {"file_data": "AAAA"}},
        {"image_url": {"url": "data:image/png;base64,AAAA"}},
        "data:image/png;base64,AAAA",
    ],
)
def test_a_content_part_of_another_shape_is_named_with_what_is_accepted(server, png, part):
    body = chat_body(png)
    body["messages"][0]["content"].append(part)
    err = assert_error_layout(post(server, body), 400, "messages[0].content[2]")
    kind = part.get("type") if isinstance(part, dict) else None
    assert (repr(kind) if kind else "content part of") in err["message"]
    assert "'text', 'image_url'" in err["message"] and "and 1 more" not in err["message"]


# ----------------------------------------------------------------------------------- 7. bodies


def test_a_deeply_nested_body_is_a_clean_400(server, png):
    for depth in (10_000, 100_000):
        deep = b'{"model": "echocxr", "messages": ' + b"[" * depth + b"]" * depth + b"}"
        r = httpx.post(server + CHAT, content=deep, headers={"content-type": "application/json"}, timeout=60)
        err = assert_error_layout(r, 400, None)
        assert "nested too deeply" in err["message"]
    # deep enough to parse, deep enough to break a recursive check or repr of the value later
    for field in ("tools", "tool_choice", "stop", "metadata"):
        deep = {**chat_body(png), field: json.loads("[" * 900 + "]" * 900)}
        err = assert_error_layout(post(server, deep), 400, None)
        assert "nested deeper than" in err["message"]
    ok = chat_body(png, max_tokens=4, metadata={"a": "b"})
    assert post(server, ok).status_code == 200  # the server goes on


def test_the_default_body_limit_takes_a_real_16_bit_radiograph(backend):
    """A 4096x4096 16-bit PNG (an ordinary CXR export; 20 MB, 27 MB as base64) passes the default
    limits; the default is the one in `Limits`, which the CLI reads."""
    import argparse

    import numpy as np
    from PIL import Image

    from echocxr.serve.cli import add_arguments, config_from_args

    assert Limits().max_body_bytes == 64 * 2**20
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--ckpt", "x"])).limits == Limits()
    rng = np.random.default_rng(0)
    pixels = np.arange(4096, dtype=np.uint16)[None, :] * 8 + rng.integers(
        0, 64, (4096, 4096), dtype=np.uint16
    )
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    assert 16 * 2**20 < len(buf.getvalue()) < 24 * 2**20
    body = json.dumps(chat_body(buf.getvalue(), max_tokens=4)).encode()
    del pixels, buf
    app = create_app(backend, ServeConfig(max_batch=1, limits=Limits(max_tokens=48)))
    with BackgroundServer(app) as url:
        r = httpx.post(url + CHAT, content=body, headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code == 200, r.text[:300]


def test_a_view_field_given_twice_is_a_422(server, png):
    one = ("a.png", png, "image/png")
    for field, files in (
        ("frontal", [("frontal", one), ("frontal", one)]),
        ("lateral", [("frontal", one), ("lateral", one), ("lateral", one)]),
        ("frontal", [("frontal", one), ("frontal", one), ("lateral", one), ("lateral", one)]),
    ):
        r = httpx.post(server + "/v1/reports", files=files, timeout=60)
        err = assert_error_layout(r, 422, field)
        assert "2 times" in err["message"]
    r = httpx.post(
        server + "/v1/reports", files={"frontal": one}, data={"language": ["en", "zh"]}, timeout=60
    )
    assert_error_layout(r, 422, "language")
    r = httpx.post(server + "/v1/reports", files={"frontal": ("a.png", png)}, data={"view": "PA"}, timeout=60)
    assert_error_layout(r, 400, "view")


# ----------------------------------------------------------------------------------- 8. disconnect


class SlowBackend:
    """The backend, with each commit event held back 40 ms (so a client can leave mid-stream)."""

    def __init__(self, backend):
        self._b = backend

    def __getattr__(self, name):
        return getattr(self._b, name)

    def decode(self, examples, cfg, caps, on_event=None, seeds=None):
        def slow(ev):
            time.sleep(0.04)
            on_event(ev)

        return self._b.decode(examples, cfg, caps, slow, seeds=seeds)


def _gauge(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(next(x for x in text.splitlines() if x.startswith(name + " ")).split()[-1])


def test_a_client_that_leaves_mid_stream_frees_its_slot(backend, png):
    limits = Limits(max_body_bytes=LIMITS.max_body_bytes, max_tokens=48, max_queue=1)
    app = create_app(SlowBackend(backend), ServeConfig(max_batch=1, max_wait_ms=0, limits=limits))
    with BackgroundServer(app) as url:
        body = {**chat_body(png, max_tokens=48), "stream": True}
        with httpx.stream("POST", url + CHAT, json=body, timeout=60) as s:
            lines = s.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk
            assert _gauge(url, "echocxr_requests_in_flight") == 1
        deadline = time.monotonic() + 10  # the client has gone after the first chunk
        while _gauge(url, "echocxr_requests_in_flight") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _gauge(url, "echocxr_requests_in_flight") == 0
        assert _gauge(url, "echocxr_queue_depth") == 0
        r = httpx.post(url + CHAT, json=chat_body(png, max_tokens=4), timeout=60)
        assert r.status_code == 200, r.text  # the one queue slot is free again
        assert _gauge(url, "echocxr_requests_in_flight") == 0
