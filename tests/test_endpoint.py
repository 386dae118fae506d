"""`lvit.llm.endpoint`: the OpenAI-compatible client's retry rules, against a scripted server on 127.0.0.1."""

from __future__ import annotations

import logging
import time

import pytest
from scripted_server import Fault, ScriptedServer

from lvit.errors import LvitError
from lvit.llm.endpoint import ChatClient, Endpoint, EndpointError, retry_after_seconds, run_concurrently


def _client(server, **kw) -> ChatClient:
    options = dict(timeout=5.0, retries=3, backoff=0.01, max_backoff=0.05)
    options.update(kw)
    return ChatClient(Endpoint(server.base_url, "scripted", **options))


def _script(*steps):
    """A responder that plays `steps` in order, then answers "ok"."""
    return lambda body, n: steps[n] if n < len(steps) else "ok"


def test_429_waits_what_retry_after_says_then_succeeds():
    with ScriptedServer(_script(Fault("429", retry_after="1"))) as server:
        reply = _client(server).chat([{"role": "user", "content": "hi"}])
        assert reply.text == "ok" and reply.attempts == 2
        gap = server.requests[1].at - server.requests[0].at
        assert 0.95 <= gap < 3.0  # the backoff alone would have been 0.01 s


def test_5xx_dropped_connection_and_timeout_are_retried_with_backoff():
    steps = (Fault("500"), Fault("drop"), Fault("slow", seconds=1.0, text="late"), Fault("503"))
    with ScriptedServer(_script(*steps)) as server:
        client = _client(server, timeout=0.3, retries=4)
        reply = client.chat([{"role": "user", "content": "hi"}])
    assert reply.text == "ok" and reply.attempts == 5
    assert len(server.requests) == 5
    assert client.usage.requests == 1 and client.usage.retries == 4
    assert client.usage.prompt_tokens == 10 and client.usage.completion_tokens == 5


def test_retries_run_out_with_the_last_reason():
    with ScriptedServer(lambda body, n: Fault("500")) as server, pytest.raises(EndpointError, match="3 attempt"):
        _client(server, retries=2).chat([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 3


@pytest.mark.parametrize(("status", "fix"), [("401", "--api-key-env"), ("404", "--model")])
def test_401_and_404_stop_at_once_with_the_fix(status, fix):
    with ScriptedServer(lambda body, n: Fault(status)) as server:
        with pytest.raises(EndpointError, match=fix) as info:
            _client(server).chat([{"role": "user", "content": "hi"}])
        assert info.value.status == int(status)
        assert len(server.requests) == 1


def test_the_key_is_sent_but_never_logged_or_shown(monkeypatch, caplog):
    monkeypatch.setenv("LVIT_TEST_KEY", "sk-secret-123")
    with ScriptedServer(_script(Fault("500"))) as server, caplog.at_level(logging.DEBUG, logger="lvit"):
        client = _client(server, api_key_env="LVIT_TEST_KEY")
        client.chat([{"role": "user", "content": "hi"}])
        assert server.requests[0].headers["Authorization"] == "Bearer sk-secret-123"
    shown = client.endpoint.dry_run_text([{"role": "user", "content": "hi"}]) + client.endpoint.describe()
    assert "sk-secret" not in shown + caplog.text and "Bearer ***" in shown


def test_bad_options_are_refused_before_any_request(monkeypatch):
    monkeypatch.delenv("LVIT_UNSET_KEY", raising=False)
    with pytest.raises(LvitError, match="not set"):
        Endpoint("http://127.0.0.1:1/v1", "m", api_key_env="LVIT_UNSET_KEY")
    with pytest.raises(LvitError, match="not an http"):
        Endpoint("127.0.0.1:8000", "m")
    monkeypatch.setenv("LVIT_ODD_KEY", "sk-–pasted")  # an en dash from a word processor
    with pytest.raises(LvitError, match="not ASCII") as caught:
        Endpoint("http://127.0.0.1:1/v1", "m", api_key_env="LVIT_ODD_KEY")
    assert "pasted" not in str(caught.value)  # the key is not shown


def test_retry_after_as_an_http_date():
    now = time.time()
    import email.utils

    assert retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_concurrent_requests_lose_and_duplicate_nothing():
    """40 requests, 4 in flight, a fault every few: each prompt answered exactly once, in flight at most 4."""

    def responder(body, n):
        if n % 5 == 1:
            return Fault("429", retry_after="0")
        if n % 7 == 3:
            return Fault("drop")
        if n % 11 == 5:
            return Fault("500")
        return "echo " + body["messages"][-1]["content"]

    with ScriptedServer(responder) as server:
        client = _client(server, retries=6)
        prompts = [f"p{i}" for i in range(40)]
        results = {}
        for task, reply, error in run_concurrently(prompts, lambda p: client.chat([{"role": "user", "content": p}]), 4):
            assert error is None
            assert task not in results
            results[task] = reply.text
    assert results == {p: f"echo {p}" for p in prompts}
    assert client.usage.requests == 40 and client.usage.retries == len(server.requests) - 40 > 0


def test_stopping_the_loop_neither_waits_for_requests_in_flight_nor_sends_the_rest():
    started = []

    def work(task):
        started.append(task)
        time.sleep(5 if task == "slow" else 0)
        return task

    t0 = time.monotonic()
    for _task, result, _error in run_concurrently(["fast", "slow", "never", "never2"], work, 2):
        assert result == "fast"
        break  # what Ctrl-C or an EndpointError does to the caller's loop
    assert time.monotonic() - t0 < 2.0
    assert "never" not in started and "never2" not in started
