"""The FastAPI app: OpenAI-compatible chat completions, the native report API, the web page.

Endpoints (docs/SERVE.md has the request and response shapes):
- POST /v1/chat/completions  OpenAI chat format; image_url parts with data: URIs; SSE with stream
- POST /v1/reports           multipart upload (frontal, optional lateral) -> findings, impression,
                             labels, timings; ?stream=1 streams blocks as SSE
- GET /v1/models, /health, /metrics (Prometheus text), / (the web page)

Every error is JSON `{"error": {"message", "type", "code"}}` with a 4xx/5xx status; the message names
the problem (and the part of the request it is in).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from importlib import resources

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from echocxr.decode.config import DECODERS
from echocxr.errors import UserError
from echocxr.serve.batcher import Batcher, Closed, Delta, Done, Failed, Job, QueueFull
from echocxr.serve.config import ServeConfig
from echocxr.serve.images import decode_upload
from echocxr.serve.schemas import ChatRequest, data_uri_bytes, image_parts, language_of


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class BodyTooLarge(Exception):
    pass


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


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


class Guard:
    """ASGI middleware: the body-size limit (413) and per-request metrics."""

    ENDPOINTS = ("/v1/chat/completions", "/v1/reports", "/v1/models", "/health", "/metrics", "/")

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

        try:
            await self.app(scope, limited_receive, counting_send)
        finally:
            self._count(path, status[0], t0)

    def _count(self, path: str, code: int, t0: float) -> None:
        self.metrics.requests.labels(path, str(code)).inc()
        self.metrics.latency.labels(path).observe(time.perf_counter() - t0)


class Detokenizer:
    """Token ids arriving in pieces -> text deltas. Byte-level BPE can split a UTF-8 character
    across tokens; a trailing replacement character is held back until the next piece."""

    def __init__(self, backend):
        self.backend, self.ids, self.sent = backend, [], 0

    def add(self, ids: list[int], final: bool = False) -> str:
        self.ids += ids
        text = self.backend.text(self.ids)
        end = len(text) if final else len(text.rstrip("\ufffd"))
        delta, self.sent = text[self.sent : end], max(self.sent, end)
        return delta


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
        return error_response(e.status, e.message, e.kind)

    @app.exception_handler(UserError)
    async def _user_error(request, e: UserError):
        return error_response(400, str(e))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request, e: BodyTooLarge):
        return error_response(413, str(e))

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        return error_response(400, _first_error(e.errors()))

    @app.exception_handler(404)
    async def _not_found(request, e):
        return error_response(404, f"no such endpoint: {request.method} {request.url.path}", "not_found")

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

    def decode_cfg(decoder: str | None, max_tokens: int | None, temperature, top_p, seed):
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds the server's limit of {limits.max_tokens}")
        if decoder is not None and decoder not in DECODERS:
            raise ApiError(400, f"decoder must be one of {list(DECODERS)}, not {decoder!r}")
        cfg = backend.cfg
        changes = {"max_new_tokens": max_tokens or min(cfg.max_new_tokens, limits.max_tokens)}
        if decoder is not None:
            changes["decoder"] = decoder
        for k, v in (("temperature", temperature), ("top_p", top_p), ("seed", seed)):
            if v is not None:
                changes[k] = v
        return replace(cfg, **changes)

    async def start(images, language: str, cfg):
        """Queue one study; returns (job, asyncio queue of its events)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def sink(ev) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the loop is gone (server stopped): nobody is waiting
                pass

        example = await run_in_threadpool(backend.example, images, language)  # image work: off the loop
        job = Job(example, cfg, sink, n_images=len(images))
        try:
            batcher.submit(job)
        except (QueueFull, Closed) as e:
            raise ApiError(503, f"server busy: {e}", "server_error") from None
        return job, events

    async def events_of(job, events, t_arrival):
        """Delta* then one Done; a Failed or the request timeout raises ApiError."""
        deadline = t_arrival + limits.request_timeout_s
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), max(deadline - time.perf_counter(), 0.001))
                except asyncio.TimeoutError:
                    raise ApiError(
                        504, f"request timed out after {limits.request_timeout_s:g} s", "server_error"
                    ) from None
                if isinstance(ev, Failed):
                    raise ApiError(500, ev.message, "server_error")
                yield ev
                if isinstance(ev, Done):
                    metrics.tokens.inc(len(ev.result.tokens))
                    return
        finally:
            job.cancelled.set()  # a job still queued is skipped; a running one finishes unseen

    def timings(done: Done, t_arrival: float) -> dict:
        r = done.result
        return {
            "queue_ms": round(done.queue_ms, 2),
            "prefill_ms": round(r.prefill_ms, 2),
            "decode_ms": round(r.decode_ms, 2),
            "total_ms": round((time.perf_counter() - t_arrival) * 1000, 2),
            "forwards": r.forwards,
            "tokens": len(r.tokens),
            "batch_size": done.batch_size,
        }

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
        try:
            req = ChatRequest.model_validate(raw)
        except ValidationError as e:
            raise ApiError(400, _first_error(e.errors())) from None
        if req.model != model_name:
            raise ApiError(
                404, f"unknown model {req.model!r}; this server serves {model_name!r}", "model_not_found"
            )
        parts = image_parts(req)
        _check_count(len(parts))
        cfg = decode_cfg(
            req.decoder, req.max_completion_tokens or req.max_tokens, req.temperature, req.top_p, req.seed
        )
        language = language_of(req)
        images = await run_in_threadpool(
            lambda: [
                decode_upload(data_uri_bytes(n, u, limits.max_body_bytes), n, max_side=limits.max_side)
                for n, u in parts
            ]
        )
        job, events = await start(images, language, cfg)
        rid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        prompt_tokens = backend.prompt_tokens(len(images), language)

        def usage(n: int) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

        def extra(done: Done) -> dict:
            return {
                "decoder": cfg.decoder,
                "block_size": cfg.block_size,
                "language": language,
                **timings(done, t_arrival),
            }

        if not req.stream:
            done = None
            async for ev in events_of(job, events, t_arrival):
                done = ev if isinstance(ev, Done) else done
            text = backend.text(done.result.tokens)
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop" if done.result.stopped else "length",
                    }
                ],
                "usage": usage(len(done.result.tokens)),
                "echocxr": extra(done),
            }

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict, finish=None, **more) -> str:
            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}
            return sse({**c, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **more})

        async def stream():
            detok = Detokenizer(backend)
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for ev in events_of(job, events, t_arrival):
                    if isinstance(ev, Delta):
                        text = detok.add(ev.tokens)
                        yield chunk(
                            {"content": text},
                            echocxr={"forwards": ev.forwards, "elapsed_ms": round(ev.elapsed_ms, 2)},
                        )
                    else:
                        tail = detok.add([], final=True)
                        if tail:
                            yield chunk({"content": tail})
                        yield chunk({}, "stop" if ev.result.stopped else "length", echocxr=extra(ev))
                        if include_usage:
                            c = {
                                "id": rid,
                                "object": "chat.completion.chunk",
                                "created": created,
                                "model": model_name,
                            }
                            yield sse({**c, "choices": [], "usage": usage(len(ev.result.tokens))})
            except ApiError as e:  # headers are sent: the error travels as an SSE event
                yield sse({"error": {"message": e.message, "type": e.kind, "code": e.status}})
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
        form = await request.form(max_files=limits.max_images + 1, max_fields=16)
        uploads = []
        for field in ("frontal", "lateral"):
            f = form.get(field)
            if f is None or f == "":
                continue
            if isinstance(f, str):
                raise ApiError(400, f"{field}: must be a file upload, got a text field")
            uploads.append((f.filename or field, await f.read()))
        if not uploads or form.get("frontal") in (None, ""):
            raise ApiError(400, "frontal: missing; upload the frontal image as the form field 'frontal'")
        language = str(form.get("language") or "en")
        if language not in ("en", "zh"):
            raise ApiError(400, f"language must be 'en' or 'zh', not {language!r}")
        decoder = form.get("decoder") or None
        max_tokens = _int_field(form.get("max_tokens"), "max_tokens")
        cfg = decode_cfg(decoder, max_tokens, None, None, None)
        images = await run_in_threadpool(
            lambda: [decode_upload(data, name, max_side=limits.max_side) for name, data in uploads]
        )
        job, events = await start(images, language, cfg)

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
                "timings": timings(done, t_arrival),
                "trained_on": backend.trained_on,
            }

        if not stream:
            done = None
            async for ev in events_of(job, events, t_arrival):
                done = ev if isinstance(ev, Done) else done
            return result(done)

        async def sse_stream():
            detok, n = Detokenizer(backend), 0
            try:
                async for ev in events_of(job, events, t_arrival):
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
                yield sse({"error": {"message": e.message, "type": e.kind, "code": e.status}}, "error")

        return StreamingResponse(
            sse_stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    def _check_count(n: int) -> None:
        if n == 0:
            raise ApiError(400, "no image: send the radiograph as an image_url part with a data: URI")
        if n > limits.max_images:
            raise ApiError(400, f"{n} images; at most {limits.max_images} per study (frontal, lateral)")

    return app


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
        raise ApiError(400, f"{name} must be an integer, got {value!r}") from None
    if n < 1:
        raise ApiError(400, f"{name} must be at least 1, got {n}")
    return n


def _first_error(errors) -> str:
    if not errors:
        return "invalid request"
    e = errors[0]
    where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {e.get('msg', 'invalid')}{more}"


def _labels(text: str, language: str) -> list[dict]:
    """The labeler's findings for the report (Chinese is mapped back to English first: the labeler
    reads English; `data.zh.zh_to_en` inverts the renderer the model was trained on)."""
    from echocxr.data.labeler import label_report

    if language == "zh":
        from echocxr.data.zh import zh_to_en

        text = zh_to_en(text)
    return [f.to_dict() for _, f in sorted(label_report(text).items())]
