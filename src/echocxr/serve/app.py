"""The FastAPI app: OpenAI-compatible chat completions, the native report API, the web page.

Endpoints (docs/SERVE.md has the request and response shapes):
- POST /v1/chat/completions  OpenAI chat format; image_url parts with data: URIs; SSE with stream
- POST /v1/reports           multipart upload (frontal, optional lateral) -> findings, impression,
                             labels, timings; ?stream=1 streams blocks as SSE
- GET /v1/models, /health, /metrics (Prometheus text), / (the web page)

Every error is OpenAI's layout, `{"error": {"message", "type", "param", "code"}}`, with a 4xx/5xx
status: `message` is one line naming the problem, `param` the offending field (or null), `code` a
string ("model_not_found", "invalid_value", ...); the openai client reads exactly that.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import aclosing
from dataclasses import replace
from importlib import resources

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from echocxr.decode.config import DECODERS
from echocxr.errors import UserError
from echocxr.serve.batcher import Batcher, Closed, Delta, Done, Failed, Job, QueueFull
from echocxr.serve.config import ServeConfig
from echocxr.serve.images import decode_upload
from echocxr.serve.schemas import (
    RequestError,
    data_uri_bytes,
    image_parts,
    language_of,
    parse_request,
    request_error,
)

# the error code of a status when the error names none
CODES = {
    400: "invalid_value",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_value",
    500: "internal_error",
    503: "server_busy",
    504: "timeout",
}


class ApiError(Exception):
    """An error answer: HTTP status, one-line message, the offending field (or None), the code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or CODES.get(status, "invalid_value" if status < 500 else "internal_error")

    def body(self) -> dict:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class BodyTooLarge(Exception):
    pass


def error_response(status: int, message: str, param: str | None = None, code: str | None = None):
    e = ApiError(status, message, param, code)
    return JSONResponse(e.body(), status_code=status)


class Metrics:
    """Prometheus metrics in the app's own registry (two apps in one process do not collide)."""

    def __init__(self, queue_depth):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("echocxr_requests", "HTTP requests", ["endpoint", "code"], registry=r)
        self.latency = Histogram(
            "echocxr_request_seconds",
            "request latency (until the last byte is sent)",
            ["endpoint"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.batch_size = Histogram(
            "echocxr_batch_size", "rows per decode batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.tokens = Counter("echocxr_generated_tokens", "generated tokens (EOS excluded)", registry=r)
        self.depth = Gauge("echocxr_queue_depth", "requests waiting for a decode batch", registry=r)
        self.depth.set_function(queue_depth)
        self.in_flight = Gauge(
            "echocxr_requests_in_flight", "report requests received and not yet fully answered", registry=r
        )


class Guard:
    """ASGI middleware: the body-size limit (413) and per-request metrics, the in-flight gauge
    included (a request leaves it when its last byte is sent or its client goes away)."""

    ENDPOINTS = ("/v1/chat/completions", "/v1/reports", "/v1/models", "/health", "/metrics", "/")
    DECODING = ("/v1/chat/completions", "/v1/reports")

    def __init__(self, app, *, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.ENDPOINTS else "other"
        t0, status = time.perf_counter(), [500]
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            resp = error_response(
                413, f"request body of {int(length)} bytes exceeds the limit of {self.limit}"
            )
            self._count(path, 413, t0)
            return await resp(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(f"request body exceeds the limit of {self.limit} bytes")
            return msg

        async def counting_send(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        in_flight = self.metrics.in_flight if path in self.DECODING else None
        if in_flight is not None:
            in_flight.inc()
        try:
            await self.app(scope, limited_receive, counting_send)
        finally:
            if in_flight is not None:
                in_flight.dec()
            self._count(path, status[0], t0)

    def _count(self, path: str, code: int, t0: float) -> None:
        self.metrics.requests.labels(path, str(code)).inc()
        self.metrics.latency.labels(path).observe(time.perf_counter() - t0)


class Detokenizer:
    """Token ids arriving in pieces -> text deltas, ending before the first stop phrase.

    Byte-level BPE can split a UTF-8 character across tokens: a trailing replacement character is
    held back until the next piece. With `stops`, the text is cut where the earliest stop phrase
    starts, and text that could still begin one (a phrase may straddle two blocks) is held back
    until it is decided, so the deltas of a stream concatenate to exactly what one `add` of all
    ids with final=True gives (the non-streamed answer)."""

    def __init__(self, backend, stops=()):
        self.backend, self.stops, self.ids, self.sent = backend, list(stops), [], 0
        self.stopped = False  # a stop phrase was found: nothing more comes
        self._phrase_end = 0  # where the found phrase ends in the text

    def add(self, ids: list[int], final: bool = False) -> str:
        if self.stopped:
            return ""
        self.ids += ids
        text = self.backend.text(self.ids)
        if not final:
            text = text.rstrip("\ufffd")
        hits = [(text.find(p), -len(p)) for p in self.stops if p in text]
        start, neg_len = min(hits) if hits else (len(text), 0)
        pending = len(text) if final else self._pending(text)  # where a partial phrase may begin
        if hits and start <= pending:
            self.stopped, self._phrase_end = True, start - neg_len
        end = min(start, pending)
        delta, self.sent = text[self.sent : end], max(self.sent, end)
        return delta

    def _pending(self, text: str) -> int:
        """The earliest index from which the rest of `text` is a proper prefix of a stop phrase."""
        best = len(text)
        for p in self.stops:
            for n in range(min(len(p) - 1, len(text)), 0, -1):
                if text.endswith(p[:n]):
                    best = min(best, len(text) - n)
                    break
        return best

    def tokens_used(self) -> int:
        """Tokens generated up to the end of the stop phrase (all tokens when none was found)."""
        if not self.stopped:
            return len(self.ids)
        lo, hi = 1, len(self.ids)  # the fewest tokens whose text reaches the phrase's end
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (
                (lo, mid) if len(self.backend.text(self.ids[:mid])) >= self._phrase_end else (mid + 1, hi)
            )
        return lo


def sse(data, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"{head}data: {body}\n\n"


def create_app(backend, config: ServeConfig | None = None) -> FastAPI:
    """The app around a loaded `ReportBackend`. The batcher's worker starts with the app's
    lifespan and is drained at shutdown (queued and running requests finish first)."""
    from contextlib import asynccontextmanager

    config = config or ServeConfig()
    limits = config.limits
    model_name = config.model_name or "echocxr"
    metrics = Metrics(lambda: batcher.depth)  # read at scrape time, when `batcher` exists
    batcher = Batcher(
        backend,
        max_batch=config.max_batch,
        max_wait_ms=config.max_wait_ms,
        max_queue=limits.max_queue,
        on_batch=metrics.batch_size.observe,
    )

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.close, drain=True)

    app = FastAPI(title="echocxr", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher, app.state.backend, app.state.metrics = batcher, backend, metrics
    app.add_middleware(Guard, limit=limits.max_body_bytes, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(UserError)
    async def _user_error(request, e: UserError):
        if isinstance(e, RequestError):
            return error_response(400, str(e), e.param, e.code)
        return error_response(400, str(e))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request, e: BodyTooLarge):
        return error_response(413, str(e))

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        err = request_error(e.errors())
        return error_response(400, str(err), err.param, err.code)

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):  # a bug: still one line in the error layout
        return error_response(500, f"internal error: {type(e).__name__}: {e}".splitlines()[0])

    @app.exception_handler(404)
    async def _not_found(request, e):
        return error_response(404, f"no such endpoint: {request.method} {request.url.path}")

    @app.exception_handler(405)
    async def _method(request, e):
        return error_response(405, f"{request.method} is not allowed on {request.url.path}")

    info = {
        "stage": backend.stage,
        "decoder": backend.cfg.decoder,
        "block_size": backend.cfg.block_size,
        "trained_on": backend.trained_on,
        "max_tokens": limits.max_tokens,
        "max_images": limits.max_images,
    }

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queue_depth": batcher.depth, **info}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": model_name, "object": "model", "created": 0, "owned_by": "echocxr", "echocxr": info}
            ],
        }

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("echocxr.serve").joinpath("static/index.html").read_text("utf-8"))

    def decode_cfg(decoder: str | None, max_tokens: int | None, temperature=None, top_p=None, top_k=None):
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} exceeds the server's limit of {limits.max_tokens}",
                "max_tokens",
            )
        if decoder is not None and decoder not in DECODERS:
            raise ApiError(400, f"decoder must be one of {list(DECODERS)}, not {decoder!r}", "decoder")
        cfg = backend.cfg
        changes = {"max_new_tokens": max_tokens or min(cfg.max_new_tokens, limits.max_tokens)}
        if decoder is not None:
            changes["decoder"] = decoder
        for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)):
            if v is not None:
                changes[k] = v
        return replace(cfg, **changes)

    async def start(images, language: str, cfgs: list):
        """Queue one study once per config (the n choices of a request, each its own batch row);
        returns (jobs, an asyncio queue of (choice index, event))."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def sink_for(i: int):
            def sink(ev) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (i, ev))
                except RuntimeError:  # the loop is gone (server stopped): nobody is waiting
                    pass

            return sink

        example = await run_in_threadpool(backend.example, images, language)  # image work: off the loop
        jobs = [Job(example, cfg, sink_for(i), n_images=len(images)) for i, cfg in enumerate(cfgs)]
        try:
            batcher.submit(*jobs)
        except (QueueFull, Closed) as e:
            raise ApiError(503, f"server busy: {e}") from None
        return jobs, events

    async def events_of(jobs, events, t_arrival):
        """(index, Delta)* and one (index, Done) per job; a Failed or the request timeout raises
        ApiError. Leaving it (done, error, client gone) cancels every job of the request."""
        deadline = t_arrival + limits.request_timeout_s
        pending = set(range(len(jobs)))
        try:
            while pending:
                try:
                    i, ev = await asyncio.wait_for(events.get(), max(deadline - time.perf_counter(), 0.001))
                except asyncio.TimeoutError:
                    raise ApiError(504, f"request timed out after {limits.request_timeout_s:g} s") from None
                if isinstance(ev, Failed):
                    raise ApiError(500, ev.message)
                if isinstance(ev, Done):
                    pending.discard(i)
                    metrics.tokens.inc(len(ev.result.tokens))
                yield i, ev
        finally:
            for job in jobs:
                job.cancelled.set()  # a job still queued is skipped; a running one finishes unseen

    def timings(done: Done, t_arrival: float, tokens: int) -> dict:
        r = done.result
        return {
            "queue_ms": round(done.queue_ms, 2),
            "prefill_ms": round(r.prefill_ms, 2),
            "decode_ms": round(r.decode_ms, 2),
            "total_ms": round((time.perf_counter() - t_arrival) * 1000, 2),
            "forwards": r.forwards,
            "tokens": tokens,
            "batch_size": done.batch_size,
        }

    def finish_reason(detok: Detokenizer, done: Done | None) -> str:
        return "stop" if detok.stopped or (done is not None and done.result.stopped) else "length"

    # ------------------------------------------------------------------ OpenAI-compatible
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t_arrival = time.perf_counter()
        _require_type(request, "application/json")
        body = await request.body()
        try:
            raw = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON body: {e}") from None
        except RecursionError:
            raise ApiError(400, "malformed JSON body: nested too deeply") from None
        req = parse_request(raw)  # RequestError: a 400 naming the parameter
        if req.model != model_name:
            raise ApiError(
                404,
                f"unknown model {req.model!r}; this server serves {model_name!r}",
                "model",
                "model_not_found",
            )
        parts = image_parts(req)
        _check_count(len(parts))
        n, stops = req.n or 1, req.stop or []
        cfg = decode_cfg(
            req.decoder, req.max_completion_tokens or req.max_tokens, req.temperature, req.top_p, req.top_k
        )
        # each choice samples from its own generator: seed, seed + 1, ...; no seed: a random one
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        language = language_of(req)

        def read(part):
            try:
                data = data_uri_bytes(part.name, part.url, limits.max_body_bytes)
                return decode_upload(data, part.name, max_side=limits.max_side)
            except UserError as e:
                raise ApiError(400, str(e), part.param) from None

        images = await run_in_threadpool(lambda: [read(p) for p in parts])
        jobs, events = await start(images, language, [replace(cfg, seed=seed + i) for i in range(n)])
        rid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        prompt_tokens = backend.prompt_tokens(len(images), language)
        detoks = [Detokenizer(backend, stops) for _ in range(n)]

        def usage() -> dict:
            used = sum(d.tokens_used() for d in detoks)
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": used,
                "total_tokens": prompt_tokens + used,
            }

        def extra(done: Done | None, tokens: int) -> dict:
            head = {"decoder": cfg.decoder, "block_size": cfg.block_size, "language": language, "seed": seed}
            return {**head, **(timings(done, t_arrival, tokens) if done else {"tokens": tokens})}

        if not req.stream:
            dones: dict[int, Done] = {}
            async for i, ev in events_of(jobs, events, t_arrival):
                if isinstance(ev, Done):
                    dones[i] = ev
            choices = []
            for i, d in enumerate(detoks):
                text = d.add(dones[i].result.tokens, final=True)
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish_reason(d, dones[i]),
                    }
                )
            u = usage()
            last = max(dones.values(), key=lambda d: d.result.forwards)
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model_name,
                "choices": choices,
                "usage": u,
                "echocxr": extra(last, u["completion_tokens"]),
            }

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}

        def chunk(i: int, delta: dict, finish=None, **more) -> str:
            return sse({**head, "choices": [{"index": i, "delta": delta, "finish_reason": finish}], **more})

        async def stream():
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
            open_choices = set(range(n))
            try:
                async with aclosing(events_of(jobs, events, t_arrival)) as evs:
                    async for i, ev in evs:
                        if i not in open_choices:  # ended at a stop phrase; the row decodes on unseen
                            continue
                        d, done = detoks[i], ev if isinstance(ev, Done) else None
                        if done is None:
                            yield chunk(
                                i,
                                {"content": d.add(ev.tokens)},
                                echocxr={"forwards": ev.forwards, "elapsed_ms": round(ev.elapsed_ms, 2)},
                            )
                        else:
                            tail = d.add([], final=True)  # characters held back at a split byte
                            if tail:
                                yield chunk(i, {"content": tail})
                        if d.stopped or done is not None:
                            open_choices.discard(i)
                            yield chunk(i, {}, finish_reason(d, done), echocxr=extra(done, d.tokens_used()))
                        if not open_choices:
                            break
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage()})
            except ApiError as e:  # headers are sent: the error travels as an SSE event
                yield sse(e.body())
            yield sse("[DONE]")

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    # ------------------------------------------------------------------ native
    @app.post("/v1/reports")
    async def reports(request: Request, stream: bool = False):
        t_arrival = time.perf_counter()
        # a form without files arrives url-encoded; it then fails as "frontal: missing"
        _require_type(request, "multipart/form-data", "application/x-www-form-urlencoded")
        # room for duplicated fields, so that they get the 422 naming them, not a count error
        form = await request.form(max_files=2 * len(FORM_FIELDS), max_fields=2 * len(FORM_FIELDS))
        for field in form:
            if field not in FORM_FIELDS:
                raise ApiError(
                    400, f"unknown form field {field!r}; accepted: {', '.join(FORM_FIELDS)}", field
                )
            if len(form.getlist(field)) > 1:
                raise ApiError(422, f"{field}: given {len(form.getlist(field))} times; send it once", field)
        uploads = []
        for field in ("frontal", "lateral"):
            f = form.get(field)
            if f is None or f == "":
                continue
            if isinstance(f, str):
                raise ApiError(400, f"{field}: must be a file upload, got a text field", field)
            uploads.append((field, f.filename or field, await f.read()))
        if not uploads or form.get("frontal") in (None, ""):
            raise ApiError(
                400, "frontal: missing; upload the frontal image as the form field 'frontal'", "frontal"
            )
        language = str(form.get("language") or "en")
        if language not in ("en", "zh"):
            raise ApiError(400, f"language must be 'en' or 'zh', not {language!r}", "language")
        decoder = form.get("decoder") or None
        max_tokens = _int_field(form.get("max_tokens"), "max_tokens")
        cfg = decode_cfg(decoder, max_tokens)

        def read(field, name, data):
            try:
                return decode_upload(data, name, max_side=limits.max_side)
            except UserError as e:
                raise ApiError(400, str(e), field) from None

        images = await run_in_threadpool(lambda: [read(*u) for u in uploads])
        jobs, events = await start(images, language, [cfg])

        def result(done: Done) -> dict:
            from echocxr.data.records import parse_report

            text = backend.text(done.result.tokens)
            return {
                "model": model_name,
                "language": language,
                "decoder": cfg.decoder,
                "block_size": cfg.block_size,
                "report": text,
                **parse_report(text),
                "labels": _labels(text, language),
                "finish_reason": "stop" if done.result.stopped else "length",
                "timings": timings(done, t_arrival, len(done.result.tokens)),
                "trained_on": backend.trained_on,
            }

        if not stream:
            done = None
            async for _, ev in events_of(jobs, events, t_arrival):
                done = ev if isinstance(ev, Done) else done
            return result(done)

        async def sse_stream():
            detok, n = Detokenizer(backend), 0
            try:
                async for _, ev in events_of(jobs, events, t_arrival):
                    if isinstance(ev, Delta):
                        n += len(ev.tokens)
                        data = {"text": detok.add(ev.tokens), "tokens": n, "forwards": ev.forwards}
                        yield sse({**data, "elapsed_ms": round(ev.elapsed_ms, 2)}, "block")
                    else:
                        tail = detok.add([], final=True)  # characters held back at a split byte
                        if tail:
                            data = {"text": tail, "tokens": n, "forwards": ev.result.forwards}
                            yield sse(
                                {**data, "elapsed_ms": round(ev.result.prefill_ms + ev.result.decode_ms, 2)},
                                "block",
                            )
                        yield sse(result(ev), "done")
            except ApiError as e:
                yield sse(e.body(), "error")

        return StreamingResponse(
            sse_stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    def _check_count(n: int) -> None:
        if n == 0:
            raise ApiError(
                400, "no image: send the radiograph as an image_url part with a data: URI", "messages"
            )
        if n > limits.max_images:
            raise ApiError(
                400, f"{n} images; at most {limits.max_images} per study (frontal, lateral)", "messages"
            )

    return app


FORM_FIELDS = ("frontal", "lateral", "language", "decoder", "max_tokens")  # /v1/reports


def _require_type(request: Request, *expected: str) -> None:
    got = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if got not in expected:
        raise ApiError(415, f"content type must be {' or '.join(expected)}, got {got or 'none'!r}")


def _int_field(value, name: str) -> int | None:
    if value in (None, ""):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} must be an integer, got {value!r}", name) from None
    if n < 1:
        raise ApiError(400, f"{name} must be at least 1, got {n}", name)
    return n


def _labels(text: str, language: str) -> list[dict]:
    """The labeler's findings for the report, as the evaluation reads it: Chinese is first mapped
    back to English where it is our renderer's (`data.zh.zh_to_en`), and whatever Chinese remains
    is read by the Chinese labeler (`data.labeler_zh.label_text`)."""
    from echocxr.data.labeler_zh import label_text

    if language == "zh":
        from echocxr.data.zh import zh_to_en

        text = zh_to_en(text)
    return [f.to_dict() for _, f in sorted(label_text(text).items())]
