"""The OpenAI chat-completions request: its body (pydantic, strict JSON types), what the server does
with each of OpenAI's parameters, the images and language of the messages, data: URIs.

Every OpenAI parameter is in exactly one of SUPPORTED (acted on), IGNORED (accepted; it cannot
change a report, the reason is given) and REFUSED (accepted only at a value that asks for nothing,
any other value gets a 400 naming it); tests/test_serve_openai.py checks that against the
installed `openai` client's parameter list and docs/SERVE.md. A parameter OpenAI does not define
gets a 400 too (`decoder`, `language` and `top_k` are echocxr's extensions: the openai client sends
them with `extra_body`).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from echocxr.errors import UserError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # OpenAI's range for `seed`
MAX_N = 128  # OpenAI's ceiling for `n`
MAX_STOP = 4  # OpenAI's ceiling for the number of `stop` phrases
MAX_DEPTH = 32  # JSON nesting a body may have (a chat request needs 6); deeper is a 400

SUPPORTED = (
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
)
EXTENSIONS = ("decoder", "language", "top_k")

IGNORED = {
    "user": "an end-user id for abuse monitoring; it does not change the output",
    "safety_identifier": "an end-user id for abuse monitoring; it does not change the output",
    "prompt_cache_key": "the server keeps no prompt cache between requests",
    "prompt_cache_options": "the server keeps no prompt cache between requests",
    "prompt_cache_retention": "the server keeps no prompt cache between requests",
    "metadata": "tags for stored completions; the server stores nothing (`store` is refused)",
    "parallel_tool_calls": "only meaningful with `tools`, which are refused",
}

_empty = lambda v: not v  # noqa: E731 (None, false, 0, "", [], {})
_none = lambda v: v is None  # noqa: E731
# parameter -> (does this value ask for nothing?, why any other value cannot be honoured)
REFUSED = {
    "frequency_penalty": (_empty, "repetition penalties are not implemented"),
    "presence_penalty": (_empty, "repetition penalties are not implemented"),
    "logit_bias": (_empty, "per-token biases are not implemented"),
    "logprobs": (_empty, "log-probabilities are not returned"),
    "top_logprobs": (_empty, "log-probabilities are not returned"),
    "store": (_empty, "the server stores nothing"),
    "response_format": (lambda v: v in (None, {"type": "text"}), "the model writes free-text reports"),
    "tools": (_empty, "the model calls no tools"),
    "functions": (_empty, "the model calls no tools"),
    "tool_choice": (lambda v: v in (None, "none"), "the model calls no tools"),
    "function_call": (lambda v: v in (None, "none"), "the model calls no tools"),
    "audio": (_none, "the model writes text only"),
    "modalities": (lambda v: v in (None, ["text"]), "the model writes text only"),
    "prediction": (_none, "predicted outputs are not implemented"),
    "reasoning_effort": (lambda v: v in (None, "none"), "the model does not reason before answering"),
    "verbosity": (_none, "the report's length is the model's; cap it with max_tokens"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "the server has one tier"),
    "web_search_options": (_none, "the server searches nothing"),
    "moderation": (_none, "the server runs no moderation model"),
}


class RequestError(UserError):
    """A bad request body: `param` is the offending field (OpenAI's dotted path) or None; `code`
    is OpenAI's error code."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


_STRICT = ConfigDict(strict=True, extra="ignore")  # parts and messages may carry fields we do not use


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = _STRICT
    url: str
    detail: Literal["auto", "low", "high", "original"] | None = None  # the input size is fixed: no effect


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"]
    image_url: ImageURL


class RefusalPart(BaseModel):  # earlier assistant turns only
    model_config = _STRICT
    type: Literal["refusal"]
    refusal: str


# the content part types each role may send
PARTS = {
    "system": {"text": TextPart},
    "developer": {"text": TextPart},
    "user": {"text": TextPart, "image_url": ImagePart},
    "assistant": {"text": TextPart, "refusal": RefusalPart},
}


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: Any = None  # str, list of parts (validated by `_content`) or None
    name: str | None = None  # a participant's name: no effect

    @model_validator(mode="before")
    @classmethod
    def _content(cls, data):
        """A list content -> typed parts, one clear error per bad part (the part type given and the
        types accepted for the role) instead of pydantic's union of every alternative."""
        if not isinstance(data, dict) or not isinstance(data.get("content"), list):
            return data
        role = data.get("role")
        if role not in PARTS:
            return data  # the role's own error comes first
        accepted = PARTS[role]
        parts = []
        for i, part in enumerate(data["content"]):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in accepted:
                got = f"type {kind!r}" if isinstance(part, dict) else f"a JSON {type(part).__name__}"
                detail = (
                    f"a content part of {got} is not accepted in a {role} message; accepted types: "
                    + ", ".join(repr(t) for t in accepted)
                    + (" (image_url.url: a data: URI)" if "image_url" in accepted else "")
                )
                raise PydanticCustomError(
                    "content_part", "{detail}", {"detail": detail, "at": f".content[{i}]"}
                )
            try:
                parts.append(accepted[kind].model_validate(part))
            except ValidationError as e:
                err = e.errors()[0]
                at = f".content[{i}]" + "".join(
                    f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]
                )
                detail = "missing" if err["type"] == "missing" else err["msg"]
                raise PydanticCustomError("content_part", "{detail}", {"detail": detail, "at": at}) from None
        return {**data, "content": parts}

    @field_validator("content")
    @classmethod
    def _content_type(cls, v):
        if v is not None and not isinstance(v, str | list):
            raise PydanticCustomError("content_type", "content must be a string or a list of content parts")
        return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # the chunks carry no obfuscation padding either way


class ChatRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    # SUPPORTED
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stop: Any = None  # str, list of up to MAX_STOP str, or None (`_stop`)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # EXTENSIONS
    decoder: str | None = None  # checked against decode.config.DECODERS by the app
    language: Literal["en", "zh"] | None = None
    top_k: int | None = Field(default=None, ge=0)
    # IGNORED
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict | None = None
    prompt_cache_retention: str | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    # REFUSED unless they ask for nothing
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, int] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    store: bool | None = None
    response_format: dict | None = None
    tools: list | None = None
    functions: list | None = None
    tool_choice: Any = None
    function_call: Any = None
    audio: dict | None = None
    modalities: list[str] | None = None
    prediction: dict | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    service_tier: str | None = None
    web_search_options: dict | None = None
    moderation: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v) -> list[str]:
        """None, a string or a list of up to MAX_STOP non-empty strings -> a list of phrases."""
        phrases = [] if v is None else [v] if isinstance(v, str) else v
        if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
            raise PydanticCustomError("stop", "stop must be a string or a list of strings")
        if len(phrases) > MAX_STOP:
            raise PydanticCustomError("stop", f"stop takes at most {MAX_STOP} phrases, got {len(phrases)}")
        if "" in phrases:
            raise PydanticCustomError("stop", "stop phrases must not be empty")
        return phrases


def parse_request(raw) -> ChatRequest:
    """A decoded JSON body -> ChatRequest, checked as the OpenAI API checks it. Raises RequestError
    naming the parameter for a wrong type or range, an unknown parameter, `stream_options` without
    `stream: true`, or a REFUSED parameter with a value that asks for something."""
    if not isinstance(raw, dict):
        raise RequestError(f"the body must be a JSON object, got a {type(raw).__name__}")
    if _depth(raw) > MAX_DEPTH:  # later checks (and error messages) may recurse; keep them shallow
        raise RequestError(f"malformed JSON body: nested deeper than {MAX_DEPTH} levels")
    try:
        req = ChatRequest.model_validate(raw)
    except ValidationError as e:
        raise request_error(e.errors()) from None
    if req.stream_options is not None and not req.stream:
        raise RequestError("stream_options is only allowed when stream is true", "stream_options")
    for name, (asks_nothing, why) in REFUSED.items():
        value = getattr(req, name)
        if not asks_nothing(value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise RequestError(
                f"{name}={shown} is not supported by this server: {why}", name, "unsupported_parameter"
            )
    return req


def _depth(obj) -> int:
    """Nesting depth of decoded JSON, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict | list):
            deepest = max(deepest, d)
            stack += [(v, d + 1) for v in (x.values() if isinstance(x, dict) else x)]
    return deepest


def request_error(errors) -> RequestError:
    """pydantic's first error -> one line naming the parameter (OpenAI's `messages[0].content`)."""
    e = errors[0]
    loc = [x for x in e.get("loc", ()) if x not in ("body", "query")]  # FastAPI's prefixes
    param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")
    param += (e.get("ctx") or {}).get("at", "")
    if e["type"] == "extra_forbidden":
        return RequestError(f"unknown parameter {param!r}", param, "unknown_parameter")
    if e["type"] == "missing":
        return RequestError(f"{param}: missing required parameter", param, "missing_required_parameter")
    code = "invalid_type" if e["type"].endswith("_type") else "invalid_value"
    return RequestError(f"{param or 'body'}: {e.get('msg', 'invalid')}", param or None, code)


_CJK = re.compile(r"[\u3400-\u9fff]")


def language_of(req: ChatRequest) -> str:
    """The report language: the `language` field when given, else "zh" when a system message is
    written in Chinese (contains CJK ideographs) and "en" otherwise. The model has one fixed
    instruction per language (model/prompt.py); the system message only chooses between them."""
    if req.language:
        return req.language
    for m in req.messages:
        if m.role in ("system", "developer") and _CJK.search(_text(m)):
            return "zh"
    return "en"


def _text(m: Message) -> str:
    if isinstance(m.content, str):
        return m.content
    return " ".join(p.text for p in (m.content or []) if isinstance(p, TextPart))


@dataclass(frozen=True)
class ImageInput:
    name: str  # "image 1", "image 2": how errors name it
    url: str
    param: str  # where it is in the request, e.g. "messages[2].content[1].image_url.url"


def image_parts(req: ChatRequest) -> list[ImageInput]:
    """The study's images: the image parts of the last user message, in order. Images of earlier
    user turns are never used as views; when the last user message has none but an earlier one
    does, raises RequestError saying so (an empty list: no user message carries an image)."""
    users = [i for i, m in enumerate(req.messages) if m.role == "user"]
    if not users:
        return []
    last = users[-1]
    images = {i: _images(req.messages[i]) for i in users}
    if not images[last] and any(images.values()):
        raise RequestError(
            f"messages[{last}] (the last user message) has no image; images of earlier turns are not"
            " used: send the study's images (frontal, optional lateral) in the last user message",
            f"messages[{last}].content",
        )
    return [
        ImageInput(f"image {k + 1}", p.image_url.url, f"messages[{last}].content[{j}].image_url.url")
        for k, (j, p) in enumerate(images[last])
    ]


def _images(m: Message) -> list[tuple[int, ImagePart]]:
    """(part index, part) of the message's image parts."""
    content = m.content if isinstance(m.content, list) else []
    return [(j, p) for j, p in enumerate(content) if isinstance(p, ImagePart)]


def data_uri_bytes(name: str, uri: str, max_bytes: int) -> bytes:
    """The bytes of a base64 `data:` URI (RFC 2397: scheme and parameters case-insensitive, any
    media type and parameters, whitespace in the payload skipped). Raises UserError for other URL
    schemes, non-base64 data, or a decoded size above max_bytes."""
    uri = uri.strip()
    if uri[:5].lower() != "data:":
        raise UserError(f"{name}: only data: URIs are accepted (the server fetches nothing)")
    head, sep, payload = uri.partition(",")
    if not sep or head.split(";")[-1].strip().lower() != "base64":
        raise UserError(f"{name}: data URI must be base64 (data:<type>;base64,<data>)")
    if len(payload) * 3 // 4 > max_bytes:
        raise UserError(f"{name}: image larger than the limit of {max_bytes} bytes")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise UserError(f"{name}: invalid base64 in data URI ({e})") from None
