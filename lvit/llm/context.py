"""What an endpoint says about the model it serves, asked before a job sends its first request.

- `probe(endpoint)`: `GET {base_url}/models` once. Nothing listening there is an error at once (not a
  retry loop); a server without that route, or one that answers it with an error, is simply not asked again.
  vLLM lists each model's context length there (`max_model_len`).
- `PromptCounter`: where the context length is known and the server counts tokens (vLLM's `POST /tokenize`
  at the server's root takes the same `messages` and answers `count`), each request's prompt is counted before
  it is sent, and one whose prompt plus `max_tokens` cannot fit is refused by lvit (`RequestRefused` with
  `sent=False`) instead of being sent for the server to refuse. Any other server: nothing is counted and the
  server's own refusal (HTTP 400) is the check.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from dataclasses import dataclass

from lvit.errors import LvitError
from lvit.llm.endpoint import Endpoint, RequestRefused, http_request, nothing_listens

log = logging.getLogger(__name__)
PROBE_TIMEOUT = 10.0


@dataclass
class ServerInfo:
    """What `probe` learned: the served model's context length in tokens, when the server says it."""

    max_model_len: int | None = None


def probe(endpoint: Endpoint) -> ServerInfo:
    """Ask `GET {base_url}/models` (see the module's docstring)."""
    url = endpoint.base_url.rstrip("/") + "/models"
    try:
        status, data, _ = http_request(endpoint, "GET", url, timeout=min(endpoint.timeout, PROBE_TIMEOUT))
    except (ConnectionRefusedError, socket.gaierror):
        raise LvitError(f"{endpoint.base_url}: {nothing_listens(endpoint)}") from None
    except OSError as exc:  # a timeout or a dropped connection: the requests themselves will retry
        log.debug("GET %s failed (%s); going on without it", url, exc)
        return ServerInfo()
    if status != 200:
        return ServerInfo()
    try:
        entries = json.loads(data).get("data") or []
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return ServerInfo()
    entries = [e for e in entries if isinstance(e, dict)]
    mine = [e for e in entries if e.get("id") == endpoint.model] or (entries if len(entries) == 1 else [])
    length = mine[0].get("max_model_len") if mine else None
    return ServerInfo(length if isinstance(length, int) and length > 0 else None)


class PromptCounter:
    """Counts a request's prompt tokens with the server's `/tokenize` and refuses what cannot fit."""

    def __init__(self, endpoint: Endpoint, info: ServerInfo):
        self.endpoint = endpoint
        self.max_model_len = info.max_model_len
        root = endpoint.base_url.rstrip("/")
        root = root[: -len("/v1")] if root.endswith("/v1") else root
        self.url = root + "/tokenize"
        self.enabled = info.max_model_len is not None
        self._lock = threading.Lock()

    def check(self, messages: list[dict]) -> int | None:
        """The prompt's token count (None when not counted); `RequestRefused` (not sent) if it cannot fit."""
        if not self.enabled:
            return None
        body = {"model": self.endpoint.model, "messages": messages, "add_generation_prompt": True}
        try:
            status, data, _ = http_request(self.endpoint, "POST", self.url, json.dumps(body).encode("utf-8"))
            count = json.loads(data)["count"] if status == 200 else None
        except (OSError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            count = None
        if not isinstance(count, int):
            with self._lock:
                if self.enabled:
                    log.info("%s does not count tokens; prompts that are too long are left to the server", self.url)
                self.enabled = False
            return None
        room = self.endpoint.max_tokens or 0
        if count + room > self.max_model_len:
            with_reply = f" plus --max-tokens {room}" if room else ""
            raise RequestRefused(
                f"the prompt is {count} tokens{with_reply}, more than the model's context of "
                f"{self.max_model_len} tokens (counted by {self.url})",
                sent=False,
                too_long=True,
            )
        return count
