"""A real OpenAI-compatible chat-completions server on 127.0.0.1, for testing and benchmarking judges offline.

The URL path picks its behaviour: ``http://127.0.0.1:PORT/<mode>/v1/chat/completions`` with mode

* ``ok``: a VIEScore reply ``{"score": [s, 10]}`` whose s (0-10, an integer) is derived from a hash of the
  request's text and images, so it is deterministic; every other reply is fenced in ```json; a prompt
  that asks for ``Axis: <A number from 1 to 10>`` lines gets such lines instead;
* ``yesno``: ``logprobs`` with "Yes"/"No" top log-probabilities derived the same way;
* ``fail``: HTTP 500 every time; ``flaky``: 500 for the first two requests, then ``ok``; ``notfound``: 404;
* ``slow``: answers after ``slow_s`` seconds; ``malformed``: a reply whose JSON is cut short; ``notjson``: a
  response body that is not JSON; ``range``: score 12;
* ``latency``: ``ok`` after ``latency_s`` seconds (a served judge's think time).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

__all__ = ["JudgeServer", "expected_score"]


def _digest(body: dict) -> int:
    content = body["messages"][0]["content"]
    parts = [c.get("text") or c["image_url"]["url"] for c in content]
    return int(hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8], 16)


def expected_score(body: dict) -> int:
    """The score (0-10) the ``ok`` mode gives a request body."""
    return _digest(body) % 11


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default backlog of 5 resets connections when many requests arrive at once

    def handle_error(self, request, client_address):
        pass  # a client that timed out and hung up is part of the tests, not news


class JudgeServer:
    """``with JudgeServer() as server: server.url("ok")`` -> a base URL; ``server.requests`` counts them."""

    def __init__(self, slow_s: float = 5.0, latency_s: float = 0.2):
        self.slow_s, self.latency_s = slow_s, latency_s
        self.requests = 0
        self.bodies: list[dict] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

            def log_message(self, *args):
                pass

            def _send(self, code: int, text: str):
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                mode = self.path.strip("/").split("/")[0]
                with owner._lock:
                    owner.requests += 1
                    n = owner.requests
                    owner.bodies.append(body)
                if mode == "notfound":
                    return self._send(404, '{"error": "The model `m` does not exist."}')
                if mode == "fail" or (mode == "flaky" and n <= 2):
                    return self._send(500, '{"error": "the judge is overloaded"}')
                if mode == "slow":
                    time.sleep(owner.slow_s)
                if mode == "latency":
                    time.sleep(owner.latency_s)
                if mode == "notjson":
                    return self._send(200, "this is not json")
                message, logprobs = {"role": "assistant"}, None
                if mode == "yesno":
                    p = (_digest(body) % 101) / 100 * 0.98 + 0.01
                    message["content"] = "Yes" if p >= 0.5 else "No"
                    logprobs = {
                        "content": [
                            {
                                "token": message["content"],
                                "logprob": 0.0,
                                "top_logprobs": [
                                    {"token": "Yes", "logprob": math.log(p)},
                                    {"token": "No", "logprob": math.log(1 - p)},
                                ],
                            }
                        ]
                    }
                else:
                    score = 12 if mode == "range" else expected_score(body)
                    reply = json.dumps({"score": [score, 10], "reasoning": "deterministic test judge"})
                    if mode == "malformed":
                        reply = reply[:12] + "}"
                    text = body["messages"][0]["content"][-1].get("text", "")
                    axes = re.findall(r"^([A-Za-z -]+): <A number from 1 to 10>", text, re.MULTILINE)
                    if axes:  # a rubric that asks for "Axis: n" lines (MultiBanana's format)
                        reply = "Reasoning: fine.\n" + "".join(
                            f"{a}: {1 + (expected_score(body) + i) % 10}.\n" for i, a in enumerate(axes)
                        )
                    message["content"] = f"```json\n{reply}\n```" if n % 2 else reply
                out = {
                    "id": f"cmpl-{n}",
                    "object": "chat.completion",
                    "model": body.get("model"),
                    "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": "stop"}],
                }
                return self._send(200, json.dumps(out))

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, mode: str = "ok") -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/{mode}/v1"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
