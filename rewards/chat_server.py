"""A small OpenAI-compatible chat server (standard library ``http.server``) for the critique reward.

    python -m rewards.chat_server --model /path/to/transformers-vlm --port 8000
    python -m rewards.chat_server --scripted --port 0 --max-seconds 120

It answers ``POST /v1/chat/completions`` (text and base64 ``image_url`` parts) and ``GET /v1/models``,
binds to 127.0.0.1 unless told otherwise, prints ``READY <port>`` once listening, and can stop itself
after ``--max-requests`` requests or ``--max-seconds``. Two models:

* ``--model PATH``: a local transformers VLM (:class:`rewards.critique.TransformersVLMBackend`);
* ``--scripted``: :class:`ScriptedVLM`, a deterministic stand-in whose scores follow the image
  brightness, with directives in the prompt text to exercise clients: ``[format=tag]`` /
  ``[format=final]`` / ``[format=dims]`` (the default), ``[fail=500]``, ``[fail=garbage]``,
  ``[fail=slow:SECONDS]`` and ``[fail=first:N]`` (HTTP 503 for the first N requests of that prompt).

Large VLMs are better served by vLLM or SGLang, which speak the same protocol.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ServedError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _parts(messages: list[dict]) -> tuple[str, list]:
    from PIL import Image

    texts, images = [], []
    for message in messages:
        content = message.get("content", "")
        for part in content if isinstance(content, list) else [{"type": "text", "text": content}]:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"]
                if not url.startswith("data:"):
                    raise ServedError(400, "only base64 data URLs are accepted for images")
                images.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
            elif part.get("type") == "text":
                texts.append(part["text"])
    return "\n".join(texts), images


class ScriptedVLM:
    """Deterministic critic: every requested score is lo + (hi - lo) * mean brightness of the images."""

    _LINE = re.compile(r"^(.*?) Score \((\d+(?:\.\d+)?)-(\d+(?:\.\d+)?)\):", re.MULTILINE)

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, messages: list[dict]) -> str:
        import numpy as np

        text, images = _parts(messages)
        with self.lock:
            self.seen[text] = self.seen.get(text, 0) + 1
            count = self.seen[text]
        first = re.search(r"\[fail=first:(\d+)\]", text)
        if first and count <= int(first.group(1)):
            raise ServedError(503, f"scripted failure {count} of {first.group(1)}")
        if "[fail=500]" in text:
            raise ServedError(500, "scripted server error")
        slow = re.search(r"\[fail=slow:(\d+(?:\.\d+)?)\]", text)
        if slow:
            time.sleep(float(slow.group(1)))
        if "[fail=garbage]" in text:
            return "I cannot judge this image, sorry."
        brightness = float(np.mean([np.asarray(im, dtype=np.float32).mean() / 255 for im in images])) if images else 0.5
        critique = f"The image has a mean brightness of {brightness:.3f}."
        if "[format=tag]" in text:
            return f"{critique}\n<Score>{round(1 + 4 * brightness, 2)}</Score>"
        if "[format=final]" in text:
            return f"{critique}\nFinal Score: {round(1 + 9 * brightness, 2)}"
        lines = [critique]
        requested = self._LINE.findall(text)
        for name, lo, hi in requested:
            lo_f, hi_f = float(lo), float(hi)
            lines.append(f"**{name.strip()} Score ({lo}-{hi}):** {round(lo_f + (hi_f - lo_f) * brightness, 2)}")
        if "Final Score" in text:
            lines.append(f"Final Score: {round(1 + 4 * brightness, 2)}")
        return "\n".join(lines)


def make_handler(model, model_name: str, on_request):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            elif self.path.rstrip("/") in ("/health", "/v1/health"):
                self._send(200, {"status": "ok"})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            try:
                if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                    raise ServedError(404, f"no route {self.path}")
                length = int(self.headers.get("Content-Length", 0))
                if length > 64 * 1024 * 1024:
                    raise ServedError(413, "request too large")
                try:
                    request = json.loads(self.rfile.read(length).decode("utf-8"))
                    messages = request["messages"]
                except (ValueError, KeyError):
                    raise ServedError(400, "expected JSON with 'messages'") from None
                text = model(messages)
                self._send(200, {
                    "id": f"chatcmpl-{int(time.time() * 1000)}", "object": "chat.completion",
                    "created": int(time.time()),
                    "model": request.get("model", model_name),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                })
            except ServedError as err:
                self._send(err.status, {"error": {"message": str(err), "code": err.status}})
            except Exception as err:  # keep serving after a model error
                self._send(500, {"error": {"message": f"{type(err).__name__}: {err}"}})
            finally:
                on_request()

    return Handler


def serve(model, *, host: str = "127.0.0.1", port: int = 0, model_name: str = "critic",
          max_requests: int | None = None, max_seconds: float | None = None, ready=print) -> None:
    """Serve ``model`` (a callable ``messages -> text``) until stopped, or until the limits are reached."""
    count = {"n": 0}
    stop = threading.Event()

    def on_request() -> None:
        count["n"] += 1
        if max_requests is not None and count["n"] >= max_requests:
            stop.set()

    server = ThreadingHTTPServer((host, port), make_handler(model, model_name, on_request))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    ready(f"READY {server.server_address[1]}")
    stop.wait(timeout=max_seconds)
    server.shutdown()
    server.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewards.chat_server", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="transformers VLM directory or hub name")
    which.add_argument("--scripted", action="store_true", help="the deterministic scripted critic (tests, demos)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (printed as READY <port>)")
    parser.add_argument("--model-name", default="critic")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-requests", type=int)
    parser.add_argument("--max-seconds", type=float)
    args = parser.parse_args(argv)
    if args.scripted:
        model = ScriptedVLM()
    else:
        from rewards.critique import TransformersVLMBackend

        backend = TransformersVLMBackend(args.model, max_new_tokens=args.max_new_tokens, device=args.device)
        lock = threading.Lock()

        def model(messages):  # one generation at a time
            with lock:
                return backend(messages)
    serve(model, host=args.host, port=args.port, model_name=args.model_name, max_requests=args.max_requests,
          max_seconds=args.max_seconds, ready=lambda line: (print(line), sys.stdout.flush()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
