"""A local OpenAI-compatible chat-completions server that answers from a script, for litellm's real HTTP path."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = dict[str, Any]


def call(name: str, arguments: dict[str, Any] | str) -> Answer:
    """An answer that calls one tool; a str is sent verbatim (to script broken JSON)."""
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"tool_calls": [{"name": name, "arguments": raw}]}


def text(content: str) -> Answer:
    return {"content": content}


def fail(status: int, message: str = "scripted failure") -> Answer:
    """An HTTP error answer (a 400 the provider refuses with, a 503 it is away with)."""
    return {"status": status, "message": message}


class ScriptedModel:
    """Answers each request with the next scripted answer and records what it was sent."""

    def __init__(self) -> None:
        self.script: deque[tuple[Answer | Callable[[dict[str, Any]], Answer], float]] = deque()
        self.requests: list[dict[str, Any]] = []
        self.down_until = 0.0  # time.monotonic() before which every request gets a 503, script untouched
        self.in_flight = self.max_in_flight = 0  # requests being answered at once, now and at most
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def down_for(self, seconds: float) -> None:
        """Answer 503 to everything for ``seconds``, as a provider in an outage does."""
        self.down_until = time.monotonic() + seconds

    def add(self, *answers: Answer | Callable[[dict[str, Any]], Answer], delay: float = 0.0) -> None:
        for a in answers:
            self.script.append((a, delay))

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> None:
        model = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                model.requests.append(body)
                if time.monotonic() < model.down_until:
                    self._send(503, {"error": {"message": "overloaded, try later", "type": "test"}})
                    return
                if not model.script:
                    self._send(500, {"error": {"message": "the script has no answer left", "type": "test"}})
                    return
                answer, delay = model.script.popleft()
                if callable(answer):
                    answer = answer(body)
                with model._lock:
                    model.in_flight += 1
                    model.max_in_flight = max(model.max_in_flight, model.in_flight)
                try:
                    time.sleep(delay)
                finally:
                    with model._lock:
                        model.in_flight -= 1
                if "status" in answer:
                    self._send(answer["status"], {"error": {"message": answer["message"], "type": "test"}})
                    return
                self._send(200, _completion(body.get("model", "scripted"), answer, len(model.requests)))

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _completion(model: str, answer: Answer, n: int) -> dict[str, Any]:
    calls = [
        {"id": f"call_{n}_{i}", "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for i, c in enumerate(answer.get("tool_calls", []))
    ]
    message: dict[str, Any] = {"role": "assistant", "content": answer.get("content")}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": f"chatcmpl-{n}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
        "usage": {"prompt_tokens": 120 + n, "completion_tokens": 20, "total_tokens": 140 + n},
    }
