"""`echocxr serve` against real clients: the official `openai` package (streaming and not), httpx for
the native API and every bad input, a bounded load test, metrics, grouping and draining.

One tiny random-weight checkpoint (stage dcd, block 4) and one server on 127.0.0.1 per module.
Random weights write noise text, but deterministic noise: at temperature 0 every request must get
exactly the tokens the slow reference (`decode.api.generate`, one image per batch) gives.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time

import httpx
import pytest
import torch
from PIL import Image

from echocxr.decode.api import DecodeConfig, Engine
from echocxr.model.config import get_preset
from echocxr.model.image_processing import make_image_processor
from echocxr.model.tokenizer import train_bpe
from echocxr.model.vlm import EchoVLM
from echocxr.serve.app import Detokenizer, create_app
from echocxr.serve.backend import ReportBackend
from echocxr.serve.background import BackgroundServer
from echocxr.serve.batcher import Batcher, Delta, Done, Job
from echocxr.serve.config import Limits, ServeConfig
from echocxr.serve.images import decode_upload

TEXTS = [
    "Findings: The heart is normal in size. No pleural effusion. No pneumothorax.\nImpression: Normal chest.",
    "Findings: Mild cardiomegaly. Small left pleural effusion.\nImpression: Cardiomegaly with effusion.",
    "所见：心影大小正常。无胸腔积液。无气胸。\n印象：胸部未见异常。",
] * 20
BLOCK = 4
LIMITS = Limits(max_body_bytes=3 * 2**20, max_images=2, max_side=2048, max_tokens=48, request_timeout_s=120)


def build_ckpt(out):
    torch.manual_seed(0)
    tok = train_bpe(TEXTS, 400)
    cfg = get_preset("tiny")
    model = EchoVLM.from_config(cfg, tok, seed=0).eval()
    extra = {"stage": "dcd", "block_size": BLOCK, "trained_on": "phantom"}
    model.save_pretrained(out, tok, make_image_processor(cfg.image_size), extra=extra)
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.set_num_threads(1)
    return build_ckpt(tmp_path_factory.mktemp("serve") / "dcd")


@pytest.fixture(scope="module")
def pngs(iu_images):
    return {p.name: p.read_bytes() for p in sorted(iu_images.glob("*.png"))}


@pytest.fixture(scope="module")
def backend(ckpt):
    return ReportBackend(ckpt, device="cpu")


@pytest.fixture(scope="module")
def reference(backend, pngs):
    """Single-request reference, computed before any server runs: a fresh `Engine` (its own
    caches) decoding one study per batch, for each (image, language, max_tokens, decoder)."""
    from echocxr.batch import Example, collate
    from echocxr.data.images import prepare_image

    cache, n_img = {}, backend.model.config.image_tokens  # the prompt's image tokens (preset)

    def ref(name: str, max_tokens: int, language: str = "en", decoder: str = "onestep") -> str:
        key = (name, max_tokens, language, decoder)
        if key not in cache:
            img = decode_upload(pngs[name], name, max_side=4096)
            example = Example([prepare_image(img, backend.model.config.image_size)], language)
            batch = collate([example], backend.tokenizer, backend.processor, n_img)
            cfg = DecodeConfig(decoder=decoder, block_size=BLOCK, steps=BLOCK, max_new_tokens=max_tokens)
            engine = Engine(backend.model, cfg, device="cpu", tokenizer=backend.tokenizer)  # fresh caches
            ids = engine.generate(batch).tokens[0]
            cache[key] = backend.text([t for t in ids if t != backend.eos])
        return cache[key]

    names = sorted(pngs)
    for name in names:  # the load test's references, before the server owns the model
        for n in (6, 9, 12):
            ref(name, n)
    ref(names[0], 12, "zh")
    ref(names[0], 8, "en", "ar")
    return ref


@pytest.fixture(scope="module")
def server(backend, reference):
    app = create_app(backend, ServeConfig(max_batch=8, max_wait_ms=30, limits=LIMITS))
    with BackgroundServer(app) as url:
        yield url


def data_uri(png: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(png).decode()


def chat_body(png: bytes, **extra) -> dict:
    content = [
        {"type": "text", "text": "Write the report."},
        {"type": "image_url", "image_url": {"url": data_uri(png)}},
    ]
    return {"model": "echocxr", "messages": [{"role": "user", "content": content}], **extra}


# --------------------------------------------------------------------------------------- openai


def test_openai_client_plain_and_streaming(server, backend, pngs, reference):
    from openai import OpenAI

    name = sorted(pngs)[0]
    client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["echocxr"]
    body = chat_body(pngs[name])
    r = client.chat.completions.create(
        model="echocxr", messages=body["messages"], max_tokens=12, temperature=0
    )
    text = r.choices[0].message.content
    assert text == reference(name, 12)
    assert r.usage.completion_tokens == len(backend.tokenizer.encode(text, add_special_tokens=False)) or (
        r.usage.completion_tokens <= 12
    )
    assert r.usage.prompt_tokens == backend.prompt_tokens(1, "en")
    assert r.choices[0].finish_reason in ("stop", "length")
    extra = r.model_extra["echocxr"]
    assert extra["decoder"] == "onestep" and extra["block_size"] == BLOCK
    assert extra["forwards"] >= 1 and extra["prefill_ms"] > 0 and extra["tokens"] == r.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="echocxr",
            messages=body["messages"],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # one chunk per committed block of 4 tokens, each after one more fused forward
    blocks = [
        c.model_extra["echocxr"] for c in chunks if "forwards" in (c.model_extra or {}).get("echocxr", {})
    ]
    blocks = [e for e in blocks if "decoder" not in e]  # the last chunk carries the totals
    assert len(blocks) == -(-r.usage.completion_tokens // BLOCK) and len(blocks) >= 2
    assert [e["forwards"] for e in blocks] == list(range(1, len(blocks) + 1))
    assert all(a["elapsed_ms"] < b["elapsed_ms"] for a, b in zip(blocks, blocks[1:]))


def test_system_prompt_selects_chinese(server, pngs, reference):
    from openai import OpenAI

    name = sorted(pngs)[0]
    client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "system", "content": "请用中文撰写报告。"}, *chat_body(pngs[name])["messages"]]
    r = client.chat.completions.create(model="echocxr", messages=messages, max_tokens=12)
    assert r.model_extra["echocxr"]["language"] == "zh"
    assert r.choices[0].message.content == reference(name, 12, "zh")
    r = client.chat.completions.create(
        model="echocxr", messages=messages[1:], max_tokens=8, extra_body={"decoder": "ar"}
    )
    assert r.model_extra["echocxr"]["language"] == "en" and r.model_extra["echocxr"]["decoder"] == "ar"
    assert r.choices[0].message.content == reference(name, 8, "en", "ar")


# --------------------------------------------------------------------------------------- native


def test_native_report_json_and_stream(server, pngs, reference):
    names = sorted(pngs)
    files = {
        "frontal": (names[0], pngs[names[0]], "image/png"),
        "lateral": (names[1], pngs[names[1]], "image/png"),
    }
    r = httpx.post(
        server + "/v1/reports", files=files, data={"language": "en", "max_tokens": "9"}, timeout=60
    )
    assert r.status_code == 200, r.text
    rep = r.json()
    assert set(rep) >= {"findings", "impression", "labels", "timings", "report", "decoder", "trained_on"}
    assert rep["trained_on"] == "phantom" and isinstance(rep["labels"], list)
    assert set(rep["timings"]) >= {"queue_ms", "prefill_ms", "decode_ms", "forwards", "tokens"}
    assert 1 <= rep["timings"]["tokens"] <= 9

    one = {"frontal": (names[2], pngs[names[2]], "image/png")}
    r = httpx.post(server + "/v1/reports", files=one, data={"max_tokens": "12"}, timeout=60)
    assert r.status_code == 200 and r.json()["report"] == reference(names[2], 12)
    events = []
    with httpx.stream(
        "POST", server + "/v1/reports?stream=1", files=one, data={"max_tokens": "12"}, timeout=60
    ) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        for block in s.read().decode().split("\n\n"):
            if block.strip():
                lines = dict(line.split(": ", 1) for line in block.splitlines())
                events.append((lines["event"], lines["data"]))
    import json

    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"block"}
    done = json.loads(events[-1][1])
    assert "".join(json.loads(d)["text"] for k, d in events if k == "block") == done["report"]
    assert done["report"] == reference(names[2], 12)


def test_labels_come_from_the_labeler():
    from echocxr.serve.app import _labels

    labels = _labels("Findings: Small left pleural effusion. No pneumothorax.\nImpression: Effusion.", "en")
    by = {f["observation"]: f for f in labels}
    assert by["pleural_effusion"]["status"] == "positive" and by["pleural_effusion"]["laterality"] == "left"
    assert by["pneumothorax"]["status"] == "negative"
    zh = {f["observation"]: f["status"] for f in _labels("所见：未见气胸。未见胸腔积液。\n印象：无。", "zh")}
    assert zh.get("pneumothorax") == "negative" and zh.get("pleural_effusion") == "negative"
    # free-form Chinese that our renderer never writes is read by the Chinese labeler (issue #22)
    free = {
        f["observation"]: f["status"]
        for f in _labels("双肺纹理清晰，未见明显实变；心影不大。考虑肺炎可能。", "zh")
    }
    assert free.get("consolidation") == "negative" and free.get("cardiomegaly") == "negative"
    assert free.get("pneumonia") == "uncertain"


# --------------------------------------------------------------------------------------- bad input


def _dicom_header():
    """A DX secondary-capture dataset with its file meta and no pixel data."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    return ds


def _dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _dicom_without_pixels() -> bytes:
    return _dicom_bytes(_dicom_header())


def _big_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (3000, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _bad_requests(png: bytes):
    chat = "/v1/chat/completions"
    body = chat_body(png, max_tokens=4)
    truncated = png[: len(png) // 2]
    return {
        "non-image": ("chat", chat_body(b"just some text, not an image")),
        "truncated PNG": ("chat", chat_body(truncated)),
        "DICOM without pixel data": ("chat", chat_body(_dicom_without_pixels())),
        "too many pixels": ("chat", chat_body(_big_png())),
        "not a data URI": (
            "chat",
            {
                **body,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}],
                    }
                ],
            },
        ),
        "bad base64": (
            "chat",
            chat_body(png)
            | {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}],
                    }
                ]
            },
        ),
        "no image": ("chat", {"model": "echocxr", "messages": [{"role": "user", "content": "hello"}]}),
        "too many images": (
            "chat",
            {
                "model": "echocxr",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": data_uri(png)}}] * 3,
                    }
                ],
            },
        ),
        "unknown model": ("chat", {**body, "model": "gpt-4o"}),
        "max_tokens over the ceiling": ("chat", {**body, "max_tokens": 10_000}),
        "negative max_tokens": ("chat", {**body, "max_tokens": -1}),
        "unknown decoder": ("chat", {**body, "decoder": "beam"}),
        "missing messages": ("chat", {"model": "echocxr"}),
        "malformed JSON": ("raw", (chat, b'{"model": "echocxr", "messages": [', "application/json")),
        "wrong content type": ("raw", (chat, b"{}", "text/plain")),
        "oversized body": ("raw", (chat, b"x" * (LIMITS.max_body_bytes + 1), "application/json")),
        "native: missing frontal": ("native", ({}, {"language": "en"})),
        "native: bad language": ("native", ({"frontal": ("a.png", png, "image/png")}, {"language": "fr"})),
        "native: truncated PNG": ("native", ({"frontal": ("t.png", truncated, "image/png")}, {})),
        "native: JSON instead of multipart": ("raw", ("/v1/reports", b"{}", "application/json")),
        "native: max_tokens not a number": (
            "native",
            ({"frontal": ("a.png", png, "image/png")}, {"max_tokens": "many"}),
        ),
    }


EXPECTED = {
    "non-image": (400, "not a PNG, JPEG or DICOM"),
    "truncated PNG": (400, "image 1: unreadable or corrupt"),
    "DICOM without pixel data": (400, "image 1: unreadable DICOM"),
    "too many pixels": (400, "larger than the limit of 2048"),
    "not a data URI": (400, "only data: URIs"),
    "bad base64": (400, "invalid base64"),
    "no image": (400, "no image"),
    "too many images": (400, "at most 2"),
    "unknown model": (404, "unknown model 'gpt-4o'"),
    "max_tokens over the ceiling": (400, "exceeds the server's limit of 48"),
    "negative max_tokens": (400, "max_tokens"),
    "unknown decoder": (400, "decoder"),
    "missing messages": (400, "messages"),
    "malformed JSON": (400, "malformed JSON body"),
    "wrong content type": (415, "content type must be application/json"),
    "oversized body": (413, "exceeds the limit"),
    "native: missing frontal": (400, "frontal: missing"),
    "native: bad language": (400, "language must be"),
    "native: truncated PNG": (400, "t.png: unreadable or corrupt"),
    "native: JSON instead of multipart": (415, "multipart/form-data"),
    "native: max_tokens not a number": (400, "max_tokens must be an integer"),
}


def test_every_bad_input_gets_a_clear_4xx_and_the_server_goes_on(server, pngs, reference):
    png = pngs[sorted(pngs)[0]]
    cases = _bad_requests(png)
    assert set(cases) == set(EXPECTED)
    with httpx.Client(base_url=server, timeout=60) as c:
        for label, (how, arg) in cases.items():
            if how == "chat":
                r = c.post("/v1/chat/completions", json=arg)
            elif how == "native":
                files, data = arg
                r = c.post("/v1/reports", files=files or None, data=data)
            else:
                path, content, ctype = arg
                r = c.post(path, content=content, headers={"content-type": ctype})
            status, needle = EXPECTED[label]
            assert r.status_code == status, (label, r.status_code, r.text)
            err = r.json()["error"]
            assert needle in err["message"], (label, err)
            assert "\n" not in err["message"] and "Traceback" not in r.text
            # OpenAI's layout, which the openai client reads (tests/test_serve_openai.py)
            assert set(err) == {"message", "type", "param", "code"} and isinstance(err["code"], str), label
        assert c.get("/nope").status_code == 404
        ok = c.post("/v1/chat/completions", json=chat_body(png, max_tokens=6))
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == reference(
            sorted(pngs)[0], 6
        )


# --------------------------------------------------------------------------------------- load


def test_load_200_requests_32_clients_each_equal_to_its_single_request_output(server, pngs, reference):
    names = sorted(pngs)
    plan = [(names[i % len(names)], (6, 9, 12)[i % 3], "en") for i in range(200)]
    plan = [(names[0], 12, "zh") if i % 10 == 0 else p for i, p in enumerate(plan)]  # other batches

    def body(i, name, n, lang):
        b = chat_body(pngs[name], max_tokens=n, user=str(i))
        if lang == "zh":
            b["messages"].insert(0, {"role": "system", "content": "请用中文撰写报告。"})
        return b

    async def main():
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(
            base_url=server, timeout=120, limits=httpx.Limits(max_connections=32)
        ) as c:

            async def one(i, *p):
                async with sem:
                    return i, await c.post("/v1/chat/completions", json=body(i, *p))

            return await asyncio.gather(*(one(i, *p) for i, p in enumerate(plan)))

    before = _batch_count(httpx.get(server + "/metrics").text)
    results = asyncio.run(main())
    assert sorted(i for i, _ in results) == list(range(200))  # exactly one response per request
    ids = set()
    batch_sizes = []
    for i, r in results:
        assert r.status_code == 200, r.text
        out = r.json()
        ids.add(out["id"])
        name, n, lang = plan[i]
        assert out["choices"][0]["message"]["content"] == reference(name, n, lang), (i, name, n, lang)
        assert out["echocxr"]["language"] == lang
        batch_sizes.append(out["echocxr"]["batch_size"])
    assert len(ids) == 200
    assert max(batch_sizes) > 1  # requests really were batched together
    metrics = httpx.get(server + "/metrics").text
    assert _batch_count(metrics) - before < 200
    assert "echocxr_queue_depth 0.0" in metrics
    assert 'echocxr_requests_total{code="200",endpoint="/v1/chat/completions"}' in metrics


def _batch_count(metrics: str) -> float:
    line = next(x for x in metrics.splitlines() if x.startswith("echocxr_batch_size_count"))
    return float(line.split()[-1])


# --------------------------------------------------------------------------------------- batcher


def test_batcher_groups_only_compatible_requests_and_drains_on_close(backend, pngs, reference):
    """Jobs with different decoders never share a batch; close() decodes what is queued."""
    names = sorted(pngs)
    img = decode_upload(pngs[names[0]], names[0], max_side=4096)
    sizes, events = [], {}
    batcher = Batcher(backend, max_batch=8, max_wait_ms=10_000, max_queue=64, on_batch=sizes.append)
    lock = threading.Lock()

    def sink_for(k):
        def sink(ev):
            with lock:
                events.setdefault(k, []).append(ev)

        return sink

    onestep = backend.cfg
    ar = DecodeConfig(decoder="ar", block_size=BLOCK, steps=BLOCK)
    from dataclasses import replace

    jobs = [
        Job(backend.example([img], "en"), replace(onestep, max_new_tokens=6), sink_for(i)) for i in range(3)
    ]
    jobs += [
        Job(backend.example([img], "en"), replace(ar, max_new_tokens=8), sink_for(3 + i)) for i in range(2)
    ]
    for j in jobs:
        batcher.submit(j)
    batcher.start()
    t0 = time.perf_counter()
    batcher.close(drain=True)  # the long max_wait is cut short: closing flushes the queue
    assert time.perf_counter() - t0 < 60
    assert sorted(sizes) == [2, 3]
    for k in range(5):
        terminal = [e for e in events[k] if isinstance(e, Done)]
        assert len(terminal) == 1 and isinstance(events[k][-1], Done)
        want = reference(names[0], 6) if k < 3 else reference(names[0], 8, "en", "ar")
        assert backend.text(terminal[0].result.tokens) == want
    with pytest.raises(Exception, match="shutting down"):
        batcher.submit(jobs[0])


def test_shutdown_drains_in_flight_http_requests(backend, pngs, reference):
    """Six requests are accepted and queued (the batch waits up to 3 s for company); stopping the
    server then must still answer every one of them, with the right report. (uvicorn waits for
    open requests before the app's shutdown closes the batcher, so they finish after the wait.)"""
    name = sorted(pngs)[1]
    app = create_app(backend, ServeConfig(max_batch=8, max_wait_ms=3000, limits=LIMITS))
    srv = BackgroundServer(app)
    url = srv.__enter__()
    out, errors = [], []

    def client():
        try:
            out.append(
                httpx.post(url + "/v1/chat/completions", json=chat_body(pngs[name], max_tokens=9), timeout=60)
            )
        except httpx.HTTPError as e:  # would mean an accepted request was dropped
            errors.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while app.state.batcher.depth < 6 and time.monotonic() < deadline:  # all six accepted and queued
        time.sleep(0.005)
    assert app.state.batcher.depth == 6
    srv.stop()
    for t in threads:
        t.join(60)
    assert errors == [] and len(out) == 6
    assert all(r.status_code == 200 for r in out), [r.text for r in out]
    assert {r.json()["choices"][0]["message"]["content"] for r in out} == {reference(name, 9)}


def test_metrics_and_health(server):
    h = httpx.get(server + "/health").json()
    assert h["status"] == "ok" and h["trained_on"] == "phantom" and h["decoder"] == "onestep"
    m = httpx.get(server + "/metrics")
    assert m.headers["content-type"].startswith("text/plain")
    for name in (
        "echocxr_requests_total",
        "echocxr_request_seconds_bucket",
        "echocxr_batch_size_bucket",
        "echocxr_queue_depth",
    ):
        assert name in m.text
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "/v1/reports?stream=1" in page.text


def test_detokenizer_never_splits_a_character(backend):
    ids = backend.tokenizer.encode("所见：心影大小正常。无胸腔积液。", add_special_tokens=False)
    whole = backend.text(ids)
    for step in (1, 2, 3):
        d = Detokenizer(backend)
        parts = [d.add(ids[i : i + step]) for i in range(0, len(ids), step)] + [d.add([], final=True)]
        assert "".join(parts) == whole and not any("\ufffd" in p for p in parts)


# --------------------------------------------------------------------------------------- bench


def test_bench_serve_prints_one_json_line_per_mode_and_concurrency(ckpt, iu_images, capsys, tmp_path):
    import json

    from echocxr.cli import main

    png = sorted(iu_images.glob("*.png"))[0]
    out = tmp_path / "bench.jsonl"
    argv = ["bench", "serve", "--ckpt", str(ckpt), "--image", str(png), "--concurrency", "1,3"]
    argv += ["--requests", "3", "--max-tokens", "8", "--max-batch", "4", "--direct-repeats", "1"]
    assert main([*argv, "--warmup", "1", "--append", str(out)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["batching"], x["concurrency"]) for x in lines] == [
        (True, 1),
        (False, 1),
        (True, 3),
        (False, 3),
    ]
    for x in lines:
        assert x["requests"] == 3 and x["reports_per_s"] > 0 and x["tokens_per_s"] > 0
        assert 0 < x["p50_ms"] <= x["p99_ms"] and x["tokens_per_report"] == 8
        assert x["max_batch"] == (4 if x["batching"] else 1) and x["mean_batch"] <= x["max_batch"]
    assert lines[0]["direct_p50_ms"] > 0 and "overhead" in lines[0]
    assert [json.loads(x) for x in out.read_text().splitlines()] == lines
    assert main(["bench", "serve", "--ckpt", str(ckpt), "--image", str(tmp_path / "no.png")]) == 2


def test_timeout_queue_limit_and_chunked_oversized_body(backend, pngs):
    """504 past --request-timeout (the timed-out job is dropped, never decoded), 503 when the
    queue is full, 413 for a chunked body without Content-Length."""
    png = pngs[sorted(pngs)[0]]
    limits = Limits(max_body_bytes=LIMITS.max_body_bytes, max_queue=1, request_timeout_s=0.3, max_tokens=48)
    app = create_app(backend, ServeConfig(max_batch=4, max_wait_ms=1500, limits=limits))
    with BackgroundServer(app) as url:
        first = {}
        t = threading.Thread(
            target=lambda: first.setdefault(
                "r", httpx.post(url + "/v1/chat/completions", json=chat_body(png), timeout=30)
            )
        )
        t.start()
        deadline = time.monotonic() + 10
        while app.state.batcher.depth == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        busy = httpx.post(url + "/v1/chat/completions", json=chat_body(png), timeout=30)
        assert busy.status_code == 503 and "server busy" in busy.json()["error"]["message"]
        t.join(30)
        assert (
            first["r"].status_code == 504 and "timed out after 0.3 s" in first["r"].json()["error"]["message"]
        )

        def chunks():
            for _ in range(8):
                yield b"x" * (LIMITS.max_body_bytes // 4)

        big = httpx.post(
            url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert big.status_code == 413 and "exceeds the limit" in big.json()["error"]["message"]
        time.sleep(1.6)  # the worker has taken the timed-out job by now, and skipped it
        assert app.state.batcher.depth == 0
        assert _batch_count(httpx.get(url + "/metrics").text) == 0


def test_dicom_and_jpeg_uploads(server, pngs):
    """A valid DICOM (12-bit, made from a real PNG) and a JPEG are read like the PNG."""
    import numpy as np

    png = pngs[sorted(pngs)[0]]
    arr = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.uint16) * 16
    ds = _dicom_header()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PixelData = arr.tobytes()
    jpg = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("L").save(jpg, format="JPEG", quality=95)
    for name, data in (("study.dcm", _dicom_bytes(ds)), ("study.jpg", jpg.getvalue())):
        r = httpx.post(
            server + "/v1/reports", files={"frontal": (name, data)}, data={"max_tokens": "4"}, timeout=60
        )
        assert r.status_code == 200, (name, r.text)
        assert r.json()["timings"]["tokens"] >= 1


def test_merged_rows_equal_collate_of_the_same_studies(backend, pngs):
    """The decode thread stacks one-row batches prepared by request threads; the result must be
    exactly what `batch.collate` builds from the same studies (the slow, canonical path)."""
    from echocxr.batch import Example, collate
    from echocxr.data.images import prepare_image
    from echocxr.serve.backend import merge_rows

    size, names = backend.model.config.image_size, sorted(pngs)
    for n_images in (1, 2):
        studies = [
            [decode_upload(pngs[names[(i + k) % 4]], "x", max_side=4096) for k in range(n_images)]
            for i in range(3)
        ]
        merged = merge_rows([backend.example(imgs, "zh") for imgs in studies])
        examples = [Example([prepare_image(im, size) for im in imgs], "zh") for imgs in studies]
        ref = collate(examples, backend.tokenizer, backend.processor, backend.model.config.image_tokens)
        for name in ("prompt_ids", "prompt_valid", "pixel_values", "grid_thw"):
            assert torch.equal(getattr(merged, name), getattr(ref, name)), (n_images, name)
    with pytest.raises(ValueError, match="different prompts"):
        merge_rows([backend.example(studies[0][:1], "en"), backend.example(studies[0][:1], "zh")])


def test_a_row_that_finishes_early_is_answered_before_its_batch_ends(backend, pngs, reference):
    """One batch, two studies: max_tokens 2 and 40. The short row's Done comes while the long row
    is still decoding (later Deltas of the long row follow it) and equals its single-request output."""
    from dataclasses import replace

    names = sorted(pngs)
    img = decode_upload(pngs[names[0]], names[0], max_side=4096)
    want_short = reference(names[0], 2)
    order, lock = [], threading.Lock()

    def sink_for(k):
        def sink(ev):
            with lock:
                order.append((k, ev))

        return sink

    batcher = Batcher(backend, max_batch=2, max_wait_ms=10_000, max_queue=8)
    for k, n in (("short", 2), ("long", 40)):
        batcher.submit(Job(backend.example([img], "en"), replace(backend.cfg, max_new_tokens=n), sink_for(k)))
    batcher.start()
    batcher.close(drain=True)
    done_at = {k: i for i, (k, ev) in enumerate(order) if isinstance(ev, Done)}
    assert sorted(done_at) == ["long", "short"]
    short = order[done_at["short"]][1]
    assert short.batch_size == 2 and backend.text(short.result.tokens) == want_short
    later_long = [ev for k, ev in order[done_at["short"] :] if k == "long" and isinstance(ev, Delta)]
    assert later_long, "the long row committed nothing after the short one was answered"
    long = order[done_at["long"]][1].result
    assert short.result.forwards < long.forwards and short.result.decode_ms < long.decode_ms


def test_trained_on_reaches_the_api_as_the_metadata_says(backend, server, monkeypatch):
    """The banner's source: /v1/models and /health carry the checkpoint's `trained_on`; a value
    `echocxr train` never writes, or none, reads "unknown"."""
    assert httpx.get(server + "/v1/models").json()["data"][0]["echocxr"]["trained_on"] == "phantom"
    for written, shown in (
        ("mixed", "mixed"),
        ("real", "real"),
        ("synthetic?", "unknown"),
        (None, "unknown"),
    ):
        monkeypatch.setitem(backend.meta, "trained_on", written)
        assert backend.trained_on == shown
