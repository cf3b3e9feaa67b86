"""One streamed OpenAI-compatible request, timed chunk by chunk.

Data flow: the runner builds a :class:`RequestInput` per prompt and awaits :func:`send_request`,
which POSTs a streaming body (``stream: true``, ``stream_options.include_usage``) and reads the
Server-Sent Events stream. Every ``data: {...}`` event that carries generated text (``text`` for
/v1/completions, ``delta.content`` or ``delta.reasoning_content`` for chat) is timestamped; the
``usage`` event gives the server's token counts; ``data: [DONE]`` ends the stream. The result is a
:class:`RequestOutput` with TTFT, the inter-chunk gaps (ITL) and end-to-end latency, all measured
with ``time.perf_counter`` from just before the POST is issued.

A request counts as failed (``success=False`` with ``error`` set) on a non-200 status, an
``error`` event inside the stream, a connection/timeout error, or a stream that ends without any
text: there is no TTFT to report then, and vLLM treats it the same way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

BACKENDS = ("openai", "openai-chat")


@dataclass
class RequestInput:
    prompt: str
    prompt_len: int
    output_len: int
    model: str
    api_url: str
    backend: str = "openai"
    ignore_eos: bool = False
    temperature: float = 0.0
    extra_body: dict[str, Any] | None = None
    headers: dict[str, str] | None = None


@dataclass
class RequestOutput:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int | None = None  # from the server's usage; None when it sent none
    server_prompt_tokens: int | None = None
    generated_text: str = ""
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # gaps between text chunks, seconds
    latency: float = 0.0  # request start -> last text chunk, seconds
    start_time: float = 0.0  # perf_counter at send
    chunks: int = 0  # text-bearing chunks received
    error: str = ""


def build_payload(inp: RequestInput) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": inp.model,
        "temperature": inp.temperature,
        "stream": True,
        # Without this the server sends no usage in a stream; with it we count output tokens as
        # the server does instead of re-tokenizing text (which can differ by a token or two).
        "stream_options": {"include_usage": True},
    }
    if inp.backend == "openai-chat":
        body["messages"] = [{"role": "user", "content": inp.prompt}]
        body["max_completion_tokens"] = inp.output_len
        # Older servers only know max_tokens; sending both is what vLLM's chat client does too.
        body["max_tokens"] = inp.output_len
    else:
        body["prompt"] = inp.prompt
        body["max_tokens"] = inp.output_len
    if inp.ignore_eos:
        body["ignore_eos"] = True  # vLLM/SGLang/Tandem extension: generate exactly max_tokens
    if inp.extra_body:
        body.update(inp.extra_body)
    return body


def _chunk_text(backend: str, event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if backend == "openai-chat":
        delta = c.get("delta") or {}
        # Reasoning models stream their thinking first; it is output the user waits for.
        return (delta.get("content") or "") + (delta.get("reasoning_content")
                                               or delta.get("reasoning") or "")
    return c.get("text") or ""


class SSEDecoder:
    """Splits a byte stream into SSE ``data:`` payloads.

    Network chunks do not align with events: one read may end mid-line or carry several events,
    so bytes are buffered until a newline. Comment lines (``:``) and other fields are ignored.
    """

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[str]:
        self._buf += data
        lines = self._buf.split(b"\n")
        self._buf = lines.pop()  # the unterminated tail waits for more bytes
        out = []
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8")
            if line.startswith("data:"):
                out.append(line[5:].strip())
        return out

    def flush(self) -> list[str]:
        tail, self._buf = self._buf, b""
        return self.feed(tail + b"\n") if tail.strip() else []


async def send_request(inp: RequestInput, session: aiohttp.ClientSession) -> RequestOutput:
    out = RequestOutput(prompt_len=inp.prompt_len)
    headers = {"Content-Type": "application/json", **(inp.headers or {})}
    text_parts: list[str] = []
    last = 0.0
    start = time.perf_counter()
    out.start_time = start
    try:
        async with session.post(inp.api_url, json=build_payload(inp), headers=headers) as resp:
            if resp.status != 200:
                body = (await resp.text())[:500]
                out.error = f"HTTP {resp.status} {resp.reason}: {body}"
                return out
            decoder = SSEDecoder()
            done = False
            async for data in resp.content.iter_any():
                # One timestamp per network read: events that arrive together arrived together.
                now = time.perf_counter()
                for payload in decoder.feed(data):
                    if payload == "[DONE]":
                        done = True
                        continue
                    if not payload:  # a bare "data:" line carries nothing
                        continue
                    event = json.loads(payload)
                    if "error" in event:
                        raise RuntimeError(f"stream error: {json.dumps(event['error'])[:500]}")
                    text = _chunk_text(inp.backend, event)
                    if text:
                        if out.chunks == 0:
                            out.ttft = now - start
                        else:
                            out.itl.append(now - last)
                        last = now
                        out.chunks += 1
                        text_parts.append(text)
                    usage = event.get("usage")
                    if usage:
                        out.output_tokens = usage.get("completion_tokens")
                        out.server_prompt_tokens = usage.get("prompt_tokens")
            for payload in decoder.flush():
                done = done or payload == "[DONE]"
        out.generated_text = "".join(text_parts)
        if out.chunks == 0:
            out.error = "stream ended without any generated text (no TTFT)"
            return out
        if not done:
            # The connection closed mid-answer (server crash, proxy timeout): not a completion.
            out.error = "stream ended before data: [DONE]"
            return out
        out.latency = last - start
        out.success = True
    except Exception as e:  # noqa: BLE001 - any failure of one request is a failed request
        out.success = False
        out.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return out
