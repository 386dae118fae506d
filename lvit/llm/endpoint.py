"""A small client for OpenAI-compatible chat endpoints (vLLM, SGLang, Ollama, OpenAI, `transformers serve`).

One module, used by every command that asks a text-only LLM: `lvit data generate` (the data engine),
`lvit eval llava-bench` (the judge) and `lvit eval scienceqa --arbiter-*` (the arbiter).

It speaks the one request they all need, `POST {base_url}/chat/completions` with a JSON body
(`model`, `messages`, `max_tokens`, `temperature`), with the standard library's `http.client`, so the
retry rules below are lvit's own and explicit:

- 429 (rate limited): wait what `Retry-After` says (seconds, or an HTTP date), else back off, and retry;
- 5xx, a timeout (`timeout` per request) or a dropped connection: back off and retry;
- back-off: `backoff * 2**attempt` seconds, at most `max_backoff`; at most `retries` retries;
- 400/413/422 (this request is refused: too long for the model's context, a bad parameter): `RequestRefused`,
  with the endpoint's own message, at once; callers that ask for many records reject that record and go on;
- 401/403 (the key) and 404 (the URL or the model name): stop at once with what to fix; other 4xx stop too.

The API key is read from the environment variable the user names (`api_key_env`); it is sent in the
`Authorization` header and never logged, printed or written (`describe()` and `dry_run_text()` mask it).
`run_concurrently` keeps up to `concurrency` requests in flight on threads and hands each result
back to the calling thread, in completion order, so only that thread writes files.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from lvit.errors import LvitError

log = logging.getLogger(__name__)


class EndpointError(LvitError):
    """The endpoint refused in a way retrying cannot fix (401/403/404, other 4xx), or retries ran out."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# Refusals of one request, not of the client: the next request may well pass.
REFUSED_STATUSES = (400, 413, 422)
# How endpoints say a prompt does not fit: vLLM, OpenAI and SGLang ("This model's maximum context length is
# ...", "... longer than the model's context length"), transformers serve ("... the model takes at most N,
# prompt and answer (`--max-model-len`)").
_TOO_LONG = re.compile(
    r"context[ _](length|window)|maximum context|max[_-]model[_-]len|max_position|takes at most|"
    r"too (long|many tokens)|exceeds? (the )?(model'?s? )?(max|context|limit)",
    re.IGNORECASE,
)


class RequestRefused(EndpointError):
    """One request refused (HTTP 400/413/422), with the endpoint's message (`detail`); `sent` is False when lvit
    refused it itself before sending (a prompt counted too long for the context). `too_long`: the refusal says
    the prompt and the reply do not fit in the model's context."""

    def __init__(self, detail: str, status: int | None = None, sent: bool = True, too_long: bool | None = None):
        who = f"the endpoint answered {status}" if sent else "not sent"
        super().__init__(f"{who}: {detail}", status)
        self.detail, self.sent = detail, sent
        self.too_long = bool(_TOO_LONG.search(detail)) if too_long is None else too_long


@dataclass
class Endpoint:
    """Where and how to ask: the options every LLM-using command shares (`--base-url`, `--model`, ...)."""

    base_url: str
    model: str
    api_key_env: str | None = None
    timeout: float = 120.0
    retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    temperature: float | None = None
    max_tokens: int | None = None

    def __post_init__(self):
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise LvitError(
                f"--base-url {self.base_url!r} is not an http(s) URL; pass the endpoint's OpenAI-compatible root, "
                "e.g. http://127.0.0.1:8000/v1 (vLLM, transformers serve) or https://api.openai.com/v1"
            )
        if not self.model:
            raise LvitError("--model is empty; pass the model name the endpoint serves (its /models list names them)")
        if self.timeout <= 0:
            raise LvitError(f"--timeout must be positive, got {self.timeout}")
        if self.retries < 0:
            raise LvitError(f"--retries must be 0 or more, got {self.retries}")
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise LvitError(
                f"--api-key-env {self.api_key_env}: that environment variable is not set (or empty); "
                f"export {self.api_key_env}=<your key>, or leave --api-key-env out for an endpoint without a key"
            )
        if self.api_key_env and not os.environ[self.api_key_env].isascii():
            raise LvitError(  # http.client would fail on it mid-run; the key itself is never shown
                f"--api-key-env {self.api_key_env}: the key in that variable holds characters an HTTP header "
                "cannot carry (not ASCII); check it was copied whole and without quotes or spaces"
            )

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def describe(self) -> str:
        key = f", key from ${self.api_key_env}" if self.api_key_env else ""
        return f"{self.model} at {self.base_url}{key}"

    def headers(self, mask: bool = False) -> dict[str, str]:
        out = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            out["Authorization"] = "Bearer ***" if mask else f"Bearer {os.environ.get(self.api_key_env, '')}"
        return out

    def body(self, messages: list[dict], **params) -> dict:
        body = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        body.update({k: v for k, v in params.items() if v is not None})
        return body

    def dry_run_text(self, messages: list[dict], **params) -> str:
        """The request `chat` would send, as text, the key masked (for `--dry-run`)."""
        headers = "\n".join(f"{k}: {v}" for k, v in self.headers(mask=True).items())
        body = json.dumps(self.body(messages, **params), indent=2, ensure_ascii=False)
        return f"POST {self.url}\n{headers}\n\n{body}"


@dataclass
class Reply:
    """One completion: its text, why it stopped and the tokens the endpoint counted (0 when it does not say)."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1


@dataclass
class Usage:
    """Requests and tokens over a run, thread-safe; `cost` in the user's currency from prices per 1M tokens."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, reply: Reply) -> None:
        with self._lock:
            self.requests += 1
            self.retries += reply.attempts - 1
            self.prompt_tokens += reply.prompt_tokens
            self.completion_tokens += reply.completion_tokens

    def cost(self, price_input: float | None, price_output: float | None) -> float | None:
        if price_input is None and price_output is None:
            return None
        return (self.prompt_tokens * (price_input or 0.0) + self.completion_tokens * (price_output or 0.0)) / 1e6

    def to_json(self) -> dict:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


class _Retryable(Exception):
    def __init__(self, what: str, wait: float | None = None, fix: str | None = None):
        super().__init__(what)
        self.what, self.wait = what, wait
        self.fix = fix or "Raise --retries or --timeout, or lower --concurrency."


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds to wait: a number of seconds, or an HTTP date (RFC 9110 10.2.3); None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


_FIXES = {
    401: "the endpoint rejected the API key: check --api-key-env names the variable that holds a valid key",
    403: "the endpoint refused the request: check the key's permissions for this model",
    404: "nothing at that URL or no such model: check --base-url (usually ends in /v1) and --model "
    "(GET {base}/models lists the names the endpoint serves)",
}


class ChatClient:
    """Sends chat requests to one `Endpoint` with lvit's retry rules; safe to share between threads."""

    def __init__(self, endpoint: Endpoint, usage: Usage | None = None, sleep: Callable[[float], None] = time.sleep):
        self.endpoint = endpoint
        self.usage = usage or Usage()
        self._sleep = sleep

    def chat(self, messages: list[dict], **params) -> Reply:
        ep = self.endpoint
        body = json.dumps(ep.body(messages, **params), ensure_ascii=False).encode("utf-8")
        attempt = 0
        while True:
            try:
                reply = self._post(body)
                reply.attempts = attempt + 1
                self.usage.add(reply)
                return reply
            except _Retryable as exc:
                if attempt >= ep.retries:
                    raise EndpointError(
                        f"{ep.url}: gave up after {attempt + 1} attempt(s); last: {exc.what}. {exc.fix}"
                    ) from None
                delay = exc.wait if exc.wait is not None else min(ep.max_backoff, ep.backoff * 2**attempt)
                log.debug("%s; retrying in %.2f s (attempt %d of %d)", exc.what, delay, attempt + 2, ep.retries + 1)
                self._sleep(delay)
                attempt += 1

    def _post(self, body: bytes) -> Reply:
        ep = self.endpoint
        try:
            status, data, retry_after = http_request(ep, "POST", ep.url, body)
        except TimeoutError:
            raise _Retryable(f"no answer within --timeout {ep.timeout:g} s") from None
        except ConnectionRefusedError:
            raise _Retryable("connection refused", fix=nothing_listens(ep)) from None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            raise _Retryable(f"connection failed ({type(exc).__name__}: {exc})") from None
        if status == 429:
            raise _Retryable("429 rate limited", retry_after_seconds(retry_after))
        if status >= 500:
            raise _Retryable(f"{status} server error: {_snippet(data)}")
        if status in REFUSED_STATUSES:
            raise RequestRefused(error_message(data), status)
        if status >= 400:
            fix = _FIXES.get(status, "the endpoint rejected the request").replace("{base}", ep.base_url.rstrip("/"))
            raise EndpointError(f"{ep.url} answered {status} ({_snippet(data)}): {fix}", status)
        return _parse_reply(data, ep.url)


def http_request(
    endpoint: Endpoint, method: str, url: str, body: bytes | None = None, timeout: float | None = None
) -> tuple[int, bytes, str | None]:
    """One HTTP exchange with the endpoint's headers: (status, body, Retry-After). Connection errors propagate."""
    parts = urlsplit(url)
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(parts.hostname, parts.port, timeout=timeout or endpoint.timeout)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request(method, path, body=body, headers=endpoint.headers())
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("Retry-After")
    finally:
        conn.close()


def nothing_listens(endpoint: Endpoint) -> str:
    parts = urlsplit(endpoint.base_url)
    return (
        f"Nothing accepts connections at {parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}: "
        "start the server, or check --base-url (its host and port)."
    )


def _snippet(data: bytes, n: int = 200) -> str:
    text = data.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:n] + ("..." if len(text) > n else "")


def error_message(data: bytes) -> str:
    """The message of an error body, whichever shape the server gives it (OpenAI's `error.message`, vLLM's
    `message`, FastAPI's `detail`), else the body's start."""
    try:
        payload = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _snippet(data, 400)
    if isinstance(payload, dict):
        error = payload.get("error")
        for value in (error.get("message") if isinstance(error, dict) else error, payload.get("message"),
                      payload.get("detail")):  # fmt: skip
            if isinstance(value, str) and value.strip():
                return " ".join(value.split())[:400]
            if value:
                return json.dumps(value, ensure_ascii=False)[:400]
    return _snippet(data, 400)


def _parse_reply(data: bytes, url: str) -> Reply:
    try:
        payload = json.loads(data)
        choice = payload["choices"][0]
        text = choice["message"].get("content") or ""
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        raise _Retryable(f"not a chat completion: {_snippet(data)}") from None
    usage = payload.get("usage") or {}
    return Reply(
        text=text,
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )


def run_concurrently(
    tasks: Iterable,
    work: Callable,
    concurrency: int,
) -> Iterator[tuple[object, object, BaseException | None]]:
    """Run `work(task)` for each task with up to `concurrency` in flight; yield `(task, result, error)` as each
    finishes, on the calling thread. Tasks are taken from `tasks` lazily, so stopping the loop (Ctrl-C, an
    `EndpointError`) leaves the rest unsent. Each request runs on a daemon thread: one still in flight when the
    loop stops neither holds up the process's exit nor has its result used."""
    if concurrency < 1:
        raise LvitError(f"--concurrency must be at least 1, got {concurrency}")
    it = iter(tasks)
    results: queue.Queue = queue.Queue()

    def run(task) -> None:
        try:
            results.put((task, work(task), None))
        except BaseException as exc:  # noqa: BLE001 (handed to the caller, who decides)
            results.put((task, None, exc))

    in_flight = 0
    while True:
        while in_flight < concurrency:
            task = next(it, _END)
            if task is _END:
                break
            threading.Thread(target=run, args=(task,), name="lvit-endpoint", daemon=True).start()
            in_flight += 1
        if not in_flight:
            return
        yield results.get()
        in_flight -= 1


_END = object()
