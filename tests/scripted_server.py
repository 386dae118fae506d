"""A scripted OpenAI-compatible chat server on 127.0.0.1 for the endpoint tests (stdlib `http.server` in a thread).

Each POST to `/v1/chat/completions` is answered by `responder(body, n)` (n: the request's number, from 0),
which returns one of:

- a string: a completion with that text (usage: 10 prompt tokens, 5 completion tokens);
- `Fault("429", retry_after="1")`, `Fault("500")`, `Fault("401")`, `Fault("404")`, `Fault("400", text=...)`: that
  status (with `text` as the error's message, in OpenAI's `{"error": {"message": ...}}`);
- `Fault("slow", seconds=2, text=...)`: the completion after a delay (a client timeout shorter than it fires);
- `Fault("drop")`: the connection is closed without an answer;
- `Fault("length", text=...)`: a completion cut off at the token limit (`finish_reason: length`).

`GET /v1/models` lists the model `scripted` (with `max_model_len` when the server is given one); with a
`tokenize(body)` function, `POST /tokenize` answers `{"count": tokenize(body), "max_model_len": ...}` as vLLM does,
else 404.

Every request is recorded (`server.requests`: parsed body, headers, the time it arrived), so tests can count
what was sent and check what a retry waited.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Fault:
    kind: str
    retry_after: str | None = None
    seconds: float = 0.0
    text: str = ""


@dataclass
class Request:
    body: dict
    headers: dict
    at: float


class ScriptedServer:
    def __init__(self, responder, max_model_len: int | None = None, tokenize=None):
        self.responder = responder
        self.max_model_len, self.tokenize = max_model_len, tokenize
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                model = {"id": "scripted", "object": "model"}
                if server.max_model_len is not None:
                    model["max_model_len"] = server.max_model_len
                self._json(200, {"object": "list", "data": [model]})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path.rstrip("/") == "/tokenize":
                    if server.tokenize is None:
                        self._json(404, {"detail": "Not Found"})
                    else:
                        self._json(200, {"count": server.tokenize(body), "max_model_len": server.max_model_len})
                    return
                with server._lock:
                    n = len(server.requests)
                    server.requests.append(Request(body, dict(self.headers), time.monotonic()))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                out = server.responder(body, n)
                if isinstance(out, str):
                    self._completion(out, "stop")
                elif out.kind == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                elif out.kind == "slow":
                    time.sleep(out.seconds)
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        self._completion(out.text, "stop")
                elif out.kind == "length":
                    self._completion(out.text, "length")
                else:
                    headers = {"Retry-After": out.retry_after} if out.retry_after is not None else {}
                    message = out.text or f"scripted {out.kind}"
                    self._json(int(out.kind), {"error": {"message": message}}, headers)

            def _completion(self, text, finish):
                payload = {
                    "id": "x",
                    "object": "chat.completion",
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                    ],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                }
                self._json(200, payload)

            def _json(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def user_texts(self) -> list[str]:
        """The last user message of every request received, in arrival order."""
        return [r.body["messages"][-1]["content"] for r in self.requests]
