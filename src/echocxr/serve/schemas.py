"""Request bodies of the OpenAI-compatible endpoint (pydantic), and the language rule.

Only the fields the server acts on are declared; other OpenAI fields (`n`, `stop`, `user`, ...)
are accepted and ignored, as OpenAI-compatible servers commonly do. `decoder` and `language` are
echocxr extensions (send them with the openai client's `extra_body`).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from echocxr.errors import UserError


class ImageURL(BaseModel):
    url: str


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    decoder: str | None = None  # checked against decode.config.DECODERS by the app
    language: Literal["en", "zh"] | None = None


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
    return " ".join(p.text or "" for p in (m.content or []) if p.type == "text")


def image_parts(req: ChatRequest) -> list[tuple[str, str]]:
    """(name, data URI) of every image part in user messages, in order; names are "image 1", ..."""
    urls = []
    for m in req.messages:
        if m.role == "user" and isinstance(m.content, list):
            urls += [p.image_url.url for p in m.content if p.type == "image_url" and p.image_url]
    return [(f"image {i + 1}", u) for i, u in enumerate(urls)]


def data_uri_bytes(name: str, uri: str, max_bytes: int) -> bytes:
    """The bytes of a base64 `data:` URI. Raises UserError for other URL schemes, non-base64
    data, or a decoded size above max_bytes."""
    if not uri.startswith("data:"):
        raise UserError(f"{name}: only data: URIs are accepted (the server fetches nothing)")
    head, sep, payload = uri.partition(",")
    if not sep or not head.endswith(";base64"):
        raise UserError(f"{name}: data URI must be base64 (data:<type>;base64,<data>)")
    if len(payload) * 3 // 4 > max_bytes:
        raise UserError(f"{name}: image larger than the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise UserError(f"{name}: invalid base64 in data URI ({e})") from None
