"""A stand-in for your LLM endpoint, so the example runs offline: an OpenAI-compatible server on 127.0.0.1
that writes its replies from the captions in the prompt with a few fixed rules (it understands nothing).

    python stand_in_llm.py --port 8765     # then: --base-url http://127.0.0.1:8765/v1 --model stand-in

`--delay SECONDS` makes every reply that slow (to watch the progress bar, or to stop a run midway and
resume it).

Replace it with a real model: vLLM, SGLang, Ollama, `transformers serve`, or a hosted API. It answers:

- `lvit data generate`'s requests (the system message says which kind): a conversation, a description or
  a reasoning question, built from the first caption;
- `lvit eval llava-bench`'s judge requests: "8 N" where N grows with the words the model's answer shares
  with the reference answer, then a one-line review.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _caption(user: str) -> str:
    lines = user.split("Captions:\n", 1)[-1].splitlines()
    return lines[0].strip().rstrip(".") if lines else "a picture"


def reply(messages: list[dict]) -> str:
    system, user = messages[0]["content"], messages[-1]["content"]
    if "First answer:" in user:  # the judge
        ref = set(re.findall(r"\w+", user.split("First answer:")[1].split("(end of the first answer)")[0].lower()))
        ans = set(re.findall(r"\w+", user.split("Second answer:")[1].split("(end of the second answer)")[0].lower()))
        score = 1 + round(9 * len(ref & ans) / max(1, len(ref)))
        return f"8 {score}\nThe second answer shares {len(ref & ans)} of the first answer's {len(ref)} words."
    caption = _caption(user)
    colour = next((w for w in ("red", "green", "blue", "yellow") if w in caption), "unknown")
    if "Write a detailed description" in system:
        return f"The image shows {caption.lower()}. The background is light and plain, with a little noise."
    if "cannot be answered by describing" in system:
        return (
            f"Question: Why might someone have drawn this picture?\nAnswer: The picture shows {caption.lower()}, "
            "a simple shape on a plain background, which is how test images for colour and position are made."
        )
    return (
        f"Question: What colour is the shape?\nAnswer: The shape is {colour}.\n"
        f"Question: What does the picture show?\nAnswer: It shows {caption.lower()}."
    )


class Handler(BaseHTTPRequestHandler):
    delay = 0.0

    def log_message(self, *args):
        pass

    def do_GET(self):  # /v1/models: what lvit asks first, and what the example waits for
        self._json(200, {"object": "list", "data": [{"id": "stand-in", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if not isinstance(body.get("messages"), list):
            self._json(400, {"error": {"message": "expected a chat request with messages"}})
            return
        text = reply(body["messages"])
        time.sleep(self.delay)
        self._json(200, {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": sum(len(m["content"].split()) for m in body["messages"]),
                      "completion_tokens": len(text.split())},
        })  # fmt: skip

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--delay", type=float, default=0.0, help="Seconds before each reply.")
    args = parser.parse_args()
    Handler.delay = args.delay
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"stand-in LLM at http://127.0.0.1:{server.server_address[1]}/v1 (model name: anything)", flush=True)
    server.serve_forever()
