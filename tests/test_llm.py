"""The LLM backend against a scripted OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json

import pytest

from echocxr.data.cache import DiskCache
from echocxr.data.llm import LLMClient, LLMConfig, LLMError, chinese_only, load_prompt, parse_json_object
from echocxr.errors import UserError
from helpers import LoopbackServer


class ScriptedServer(LoopbackServer):
    """Answers POST /v1/chat/completions with the scripted (status, content) replies in turn."""

    def __init__(self, script: list[tuple[int, str]]):
        self.script = list(script)
        self.requests: list[dict] = []
        super().__init__(self._answer)

    def _answer(self, path, headers, body):
        self.requests.append({"path": path, "body": body, "auth": headers.get("Authorization")})
        status, content = self.script.pop(0) if self.script else (500, "script exhausted")
        if status == 200:
            return status, {"choices": [{"message": {"role": "assistant", "content": content}}]}
        return status, {"error": content}


GOOD = json.dumps(
    {"findings": "No pleural effusion. No pneumothorax.", "impression": "No acute abnormality."}
)
ZH = json.dumps({"findings": "未见胸腔积液。未见气胸。", "impression": "未见急性异常。"})


def _client(url, cache=None, retries=3):
    sleeps: list[float] = []
    cfg = LLMConfig(
        url=url, model="baichuan-m2-32b", api_key="k", max_retries=retries, backoff_s=0.5, timeout_s=5
    )
    return LLMClient(cfg, cache=cache, sleep=sleeps.append), sleeps


def test_500_then_success_backs_off_exponentially(tmp_path):
    with ScriptedServer([(500, "boom"), (503, "busy"), (200, GOOD)]) as srv:
        client, sleeps = _client(srv.url)
        out = client.rewrite("The XXXX are clear.", "Negative.")
    assert out == json.loads(GOOD)
    assert sleeps == [0.5, 1.0] and client.requests == 3
    req = srv.requests[-1]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer k"
    assert req["body"]["model"] == "baichuan-m2-32b" and req["body"]["temperature"] == 0.0
    assert json.loads(req["body"]["messages"][1]["content"]) == {
        "findings": "The XXXX are clear.",
        "impression": "Negative.",
    }


def test_bad_json_replies_are_retried_then_fail(tmp_path):
    script = [(200, "Sure! Here is the report: findings ..."), (200, '{"findings": "x"}'), (200, "[1, 2]")]
    with ScriptedServer(script) as srv:
        client, sleeps = _client(srv.url, retries=2)
        with pytest.raises(LLMError, match="no valid reply after 3 attempts"):
            client.rewrite("a", "b")
    assert len(srv.requests) == 3 and len(sleeps) == 2


def test_client_errors_are_not_retried():
    with ScriptedServer([(400, "bad request"), (200, GOOD)]) as srv:
        client, _ = _client(srv.url)
        with pytest.raises(LLMError, match="HTTP 400"):
            client.rewrite("a", "b")
    assert len(srv.requests) == 1


def test_cache_hit_on_rerun_sends_nothing(tmp_path):
    with ScriptedServer([(200, "```json\n" + GOOD + "\n```"), (200, ZH)]) as srv:
        with DiskCache(tmp_path / "llm.sqlite") as cache:
            client, _ = _client(srv.url, cache)
            first = client.rewrite("Lungs clear.", "Normal.")
            zh = client.translate_zh(first)
        assert zh == json.loads(ZH) and len(srv.requests) == 2
        # A new client on the same cache file: a fresh process rerunning the build.
        with DiskCache(tmp_path / "llm.sqlite") as cache:
            client, _ = _client(srv.url, cache)
            assert client.rewrite("Lungs clear.", "Normal.") == first
            assert client.translate_zh(first) == zh
            assert client.requests == 0
            # A different input is not a hit.
            with pytest.raises(LLMError):
                _client(srv.url, cache, retries=0)[0].rewrite("Other.", "Normal.")
    assert len(srv.requests) == 3


def test_translation_rejects_mixed_text_and_honours_untranslatable():
    mixed = json.dumps({"findings": "未见 pleural effusion。", "impression": "正常。"})
    with ScriptedServer([(200, mixed), (200, ZH), (200, '{"untranslatable": true}')]) as srv:
        client, _ = _client(srv.url)
        assert client.translate_zh({"findings": "No effusion.", "impression": "Normal."}) == json.loads(ZH)
        assert client.translate_zh({"findings": "Odd.", "impression": "Odd."}) is None
    assert len(srv.requests) == 3


def test_unreachable_endpoint_fails_after_retries():
    client, sleeps = _client("http://127.0.0.1:9", retries=1)  # port 9 (discard): nothing listens
    with pytest.raises(LLMError, match="2 attempts"):
        client.rewrite("a", "b")
    assert sleeps == [0.5]


def test_config_from_env(monkeypatch):
    monkeypatch.delenv("ECHOCXR_LLM_URL", raising=False)
    monkeypatch.delenv("ECHOCXR_LLM_MODEL", raising=False)
    with pytest.raises(UserError, match="ECHOCXR_LLM_URL"):
        LLMConfig.from_env()
    monkeypatch.setenv("ECHOCXR_LLM_URL", "http://h:8000/v1")
    monkeypatch.setenv("ECHOCXR_LLM_MODEL", "m")
    monkeypatch.setenv("ECHOCXR_LLM_API_KEY", "secret")
    cfg = LLMConfig.from_env()
    assert cfg.endpoint == "http://h:8000/v1/chat/completions" and cfg.api_key == "secret"
    assert "secret" not in repr(cfg)


def test_parsing_helpers():
    assert parse_json_object('{"findings": " a ", "impression": "b"}', ("findings", "impression")) == {
        "findings": "a",
        "impression": "b",
    }
    assert chinese_only("右侧少量胸腔积液。PICC 导管位置正常。")
    assert not chinese_only("右侧 small effusion。") and not chinese_only("No effusion.")
    assert "JSON" in load_prompt("rewrite_en") and "Chinese" in load_prompt("translate_zh")
