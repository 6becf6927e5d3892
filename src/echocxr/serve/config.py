"""Server settings: one frozen dataclass, one source for every default (the CLI reads these)."""

from __future__ import annotations

from dataclasses import dataclass

from echocxr.errors import UserError


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond gets a 4xx naming the limit."""

    # whole HTTP body; base64 is 4/3 of the file: a 3000x3000 16-bit DICOM is ~24 MB in a data: URI,
    # a 4096x4096 16-bit PNG export ~20 MB
    max_body_bytes: int = 64 * 2**20
    max_images: int = 2  # a study: frontal, optional lateral
    max_side: int = 4096  # pixels, width and height of each image
    max_tokens: int = 512  # ceiling for `max_tokens`
    request_timeout_s: float = 300.0  # queue + decode; past it the request gets 504
    max_queue: int = 512  # accepted but not yet decoded requests; past it 503

    def __post_init__(self) -> None:
        if min(self.max_body_bytes, self.max_images, self.max_side, self.max_tokens, self.max_queue) < 1:
            raise UserError("server limits must be at least 1")
        if self.request_timeout_s <= 0:
            raise UserError("--request-timeout must be positive")


@dataclass(frozen=True)
class ServeConfig:
    """Dynamic batching: up to `max_batch` compatible requests, the first waiting at most
    `max_wait_ms` for company. `max_batch=1` is one-request-at-a-time serving."""

    max_batch: int = 32
    max_wait_ms: float = 10.0
    model_name: str | None = None  # the id clients send as `model`; default: "echocxr-<stage>"
    limits: Limits = Limits()

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise UserError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise UserError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
