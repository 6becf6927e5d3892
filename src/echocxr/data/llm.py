"""Optional LLM backend for report rewriting and Chinese translation, as the paper did with
Baichuan-M2-32B: any OpenAI-compatible `/v1/chat/completions` endpoint.

Configuration comes from arguments or the environment (`ECHOCXR_LLM_URL`, `ECHOCXR_LLM_MODEL`,
`ECHOCXR_LLM_API_KEY`). Prompts ship in `echocxr/data/prompts/`. Every reply must be one JSON
object with the expected string fields (Chinese replies: Chinese only); a reply that is not is
retried like a server error. Transient failures (HTTP 429/5xx, timeouts, refused connections)
back off exponentially. Replies are cached on disk by (model, prompt), so a rebuild sends nothing
it has sent before. Only the standard library is used.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

from echocxr.data.cache import DiskCache, content_key
from echocxr.errors import UserError


@dataclass(frozen=True)
class LLMConfig:
    url: str  # base URL ("http://host:8000" or ".../v1") or the full chat/completions URL
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = 120.0
    max_retries: int = 4  # attempts after the first
    backoff_s: float = 1.0  # first wait; doubles per retry
    temperature: float = 0.0  # deterministic replies, so a cache hit equals a fresh call
    max_tokens: int = 1024

    @staticmethod
    def from_env(url: str | None = None, model: str | None = None, api_key: str | None = None) -> LLMConfig:
        url = url or os.environ.get("ECHOCXR_LLM_URL")
        model = model or os.environ.get("ECHOCXR_LLM_MODEL")
        api_key = api_key or os.environ.get("ECHOCXR_LLM_API_KEY")
        if not url or not model:
            raise UserError(
                "--llm needs an endpoint: set ECHOCXR_LLM_URL and ECHOCXR_LLM_MODEL (or --llm-url/--llm-model)"
            )
        return LLMConfig(url=url, model=model, api_key=api_key)

    @property
    def endpoint(self) -> str:
        u = self.url.rstrip("/")
        if u.endswith("/chat/completions"):
            return u
        return f"{u}/chat/completions" if u.endswith("/v1") else f"{u}/v1/chat/completions"


class LLMError(Exception):
    """The endpoint gave no valid reply after all retries (or refused the request outright)."""


class InvalidReply(Exception):
    """A reply that is not the JSON object the prompt asks for."""


def load_prompt(name: str) -> str:
    return (resources.files("echocxr.data") / "prompts" / f"{name}.txt").read_text(encoding="utf-8")


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_json_object(content: str, keys: tuple[str, ...]) -> dict[str, str]:
    """The reply as {key: non-empty string}; anything else raises `InvalidReply`.

    One Markdown code fence around the object is tolerated (many chat models add it); prose
    around the JSON is not.
    """
    s = content.strip()
    m = _FENCE.match(s)
    if m:
        s = m.group(1)
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        raise InvalidReply(f"not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise InvalidReply("not a JSON object")
    out = {}
    for k in keys:
        v = obj.get(k)
        if not isinstance(v, str) or not v.strip():
            raise InvalidReply(f"missing or empty string field {k!r}")
        out[k] = v.strip()
    return out


_CJK = re.compile(r"[\u4e00-\u9fff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
# Abbreviations Chinese radiology reports write in Latin letters.
ZH_LATIN_OK = frozenset({"PICC", "CT", "ICD", "X", "CVC", "ECG", "MRI", "PA", "AP", "COPD", "T", "L", "C"})


def chinese_only(text: str) -> bool:
    """True when the text is Chinese, allowing only the usual Latin abbreviations (no mixed text)."""
    if not _CJK.search(text):
        return False
    return all(w.upper() in ZH_LATIN_OK for w in _LATIN_WORD.findall(text))


class LLMClient:
    """Chat completions with JSON validation, retries and a reply cache."""

    def __init__(
        self,
        cfg: LLMConfig,
        cache: DiskCache | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.cfg, self.cache, self.sleep = cfg, cache, sleep
        self.requests = 0  # HTTP requests sent (cache hits send none)

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps(
            {
                "model": self.cfg.model,
                "messages": messages,
                "temperature": self.cfg.temperature,
                "max_tokens": self.cfg.max_tokens,
            }
        ).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.cfg.api_key:
            headers["Authorization"] = f"Bearer {self.cfg.api_key}"
        req = urllib.request.Request(self.cfg.endpoint, data=body, headers=headers, method="POST")
        self.requests += 1
        with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
            payload = json.loads(resp.read().decode("utf-8"))
        try:
            return payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise InvalidReply("no choices[0].message.content in the response") from None

    def complete_json(self, system: str, user: str, validate: Callable[[str], dict]) -> dict:
        """Send one chat, return `validate(reply)`; cached, retried on transient or invalid replies."""
        key = content_key(self.cfg.endpoint, self.cfg.model, system, user)
        if self.cache is not None:
            hit = self.cache.get_json(key)
            if hit is not None:
                return hit
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                result = validate(self._post(messages))
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code != 429 and e.code < 500:  # the request itself is wrong: retrying won't help
                    raise LLMError(f"{self.cfg.endpoint}: {last} {e.reason}") from None
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                last = f"{type(e).__name__}: {e}"
                continue
            except InvalidReply as e:
                last = f"invalid reply: {e}"
                continue
            if self.cache is not None:
                self.cache.put_json(key, result)
            return result
        raise LLMError(
            f"{self.cfg.endpoint}: no valid reply after {self.cfg.max_retries + 1} attempts ({last})"
        )

    def rewrite(self, findings: str, impression: str) -> dict[str, str]:
        """Original report -> {"findings", "impression"} in standard English terminology."""
        user = json.dumps({"findings": findings, "impression": impression}, ensure_ascii=False)
        return self.complete_json(
            load_prompt("rewrite_en"), user, lambda c: parse_json_object(c, ("findings", "impression"))
        )

    def translate_zh(self, report: dict[str, str]) -> dict[str, str] | None:
        """English report -> Chinese {"findings", "impression"}, or None when the model declines."""

        def validate(content: str) -> dict:
            s = _FENCE.sub(r"\1", content.strip())
            try:
                obj = json.loads(s)
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict) and obj.get("untranslatable") is True:
                return {"untranslatable": True}
            out = parse_json_object(content, ("findings", "impression"))
            for k, v in out.items():
                if not chinese_only(v):
                    raise InvalidReply(f"{k} is not Chinese-only text")
            return out

        user = json.dumps(
            {"findings": report["findings"], "impression": report["impression"]}, ensure_ascii=False
        )
        got = self.complete_json(load_prompt("translate_zh"), user, validate)
        return None if got.get("untranslatable") else got
