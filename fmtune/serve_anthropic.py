"""Anthropic's Messages API for a served generation run (``fmtune serve RUN``): the official ``anthropic``
clients, and the tools built on them, talk to the fine-tuned model unchanged, with
``base_url="http://HOST:PORT"`` (and the service's API key as theirs, if it has one: they send it as
``x-api-key``, which the service reads).

    POST /v1/messages               {"model", "max_tokens", "messages": [{role, content}, ...], "system",
                                     "temperature", "top_p", "stop_sequences", "stream", "metadata"} -> a
                                     message of one text block; streamed as its events (message_start,
                                     content_block_start, content_block_delta ..., message_delta, message_stop)
    POST /v1/messages/count_tokens  {"model", "messages", "system"} -> {"input_tokens": n}

The conversation is asked as training asked (the run's instruction and chat template), as on the OpenAI
routes (``fmtune.serve_openai``), whose decoding this shares. ``stop_reason`` is "end_turn" (the model's end
of answer), "stop_sequence" (with the ``stop_sequence`` met) or "max_tokens"; ``usage`` counts the prompt as
the model read it and the answer. Errors have Anthropic's shape, ``{"type": "error", "error": {"type",
"message"}}``, a request it cannot serve is a 400 ``invalid_request_error`` naming the field. By design:
``temperature`` defaults to 0 (greedy: the same request, the same answer; Anthropic's default is 1); what
needs more than text in and text out is refused, never ignored: tools, images and documents, thinking,
``top_k``, a prefilled assistant turn to continue.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import Request

from fmtune.serve_base import HTTPError, Limits, json_object, open_stream, request_items, text_tokens, threaded_stream
from fmtune.serve_openai import (
    MAX_STOPS,
    StopScanner,
    chat_messages,
    decoding_options,
    first_stop,
    prompt_rows,
    read_prompts,
)

PATH = "/v1/messages"
# request fields refused unless they carry their neutral value (None: not given)
NEUTRAL = {"tools": ([],), "tool_choice": ({"type": "none"}, {"type": "auto"}), "thinking": ({"type": "disabled"},),
           "top_k": (), "container": (), "mcp_servers": ([],)}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}

_MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"type": "string", "enum": ["user", "assistant"]},
    "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}}}
_SYSTEM = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}
MESSAGES_DOC = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["model", "max_tokens", "messages"], "properties": {
        "model": {"type": "string", "description": "any name (one model is served)"},
        "max_tokens": {"type": "integer"}, "messages": {"type": "array", "items": _MESSAGE}, "system": _SYSTEM,
        "temperature": {"type": "number", "description": "default 0: greedy"}, "top_p": {"type": "number"},
        "stop_sequences": {"type": "array", "items": {"type": "string"}}, "stream": {"type": "boolean"},
        "metadata": {"type": "object"}},
    "example": {"model": "run", "max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}]}}}}}}
COUNT_DOC = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["model", "messages"], "properties": {
        "model": {"type": "string"}, "messages": {"type": "array", "items": _MESSAGE}, "system": _SYSTEM},
    "example": {"model": "run", "messages": [{"role": "user", "content": "Hello"}]}}}}}}


def error_response(status: int, message: str) -> tuple[int, dict[str, Any]]:
    """(status, body) of an error as Anthropic's API answers it: a request it cannot serve is a 400."""
    status = 400 if status == 422 else status
    return status, {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def _text(value: Any, where: str) -> str:
    """A message's or the system prompt's content: a string, or text blocks joined."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or any(not isinstance(b, dict) for b in value):
        raise HTTPError(422, f"{where}: content must be a string or a list of content blocks", param=where)
    kinds = sorted({str(b.get("type")) for b in value} - {"text"})
    if kinds:
        raise HTTPError(422, f"{where}: only text blocks are supported (this model reads text), not "
                             f"{', '.join(kinds)}", param=where)
    return "".join(str(b.get("text", "")) for b in value)


def _conversation(data: dict[str, Any]) -> list[dict[str, str]]:
    """The system prompt and messages as the run's chat reads them, ending with the user's turn."""
    value = data.get("messages")
    if not isinstance(value, list) or not value:
        raise HTTPError(422, "messages: a non-empty list of {\"role\", \"content\"} is required", param="messages")
    out = []
    if data.get("system") not in (None, "", []):
        out.append({"role": "system", "content": _text(data["system"], "system")})
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise HTTPError(422, f"messages.{j}: an object whose role is user or assistant", param="messages")
        out.append({"role": m["role"], "content": _text(m.get("content"), f"messages.{j}")})
    if out[-1]["role"] == "assistant":
        raise HTTPError(422, "the last message is the assistant's (a prefill to continue): not supported; end "
                             "with the user's turn, which the model answers", param="messages")
    return chat_messages(out)


def _options(data: dict[str, Any], limits: Limits) -> tuple[dict[str, Any], list[str]]:
    """Decoding options in Generator's terms (temperature 0, greedy, unless one is sent) and the stop sequences."""
    for key, neutral in NEUTRAL.items():
        if data.get(key) is not None and data[key] not in neutral:
            raise HTTPError(422, f"{key}: not supported by this service (one answer of text per request); leave it "
                                 "out", param=key)
    if data.get("max_tokens") is None:
        raise HTTPError(422, "max_tokens: required (the most tokens to answer with)", param="max_tokens")
    opts = decoding_options(data, limits, "max_tokens")
    stops = data.get("stop_sequences") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise HTTPError(422, f"stop_sequences: a list of at most {MAX_STOPS} non-empty strings", param="stop_sequences")
    return opts, stops


def add_routes(app: Any, generator: Any, limits: Limits, guard: Any, read_json: Any, batcher: Any) -> None:
    """POST /v1/messages and /v1/messages/count_tokens on ``app``, answering with ``generator`` (a
    ``fmtune.generation.Generator``): whole answers through ``batcher`` (concurrent greedy requests decoded
    together), streams in the same batches (``serve_base.open_stream``)."""
    model_id = generator.run_dir.name

    def ended(stops: list[str], text: str, stopped: bool) -> tuple[str, str, str | None]:
        """(the answer up to its stop sequence, stop_reason, the stop sequence met)."""
        hit = first_stop(text, stops)
        if hit:
            return text[:hit[0]], "stop_sequence", hit[1]
        return text, "end_turn" if stopped else "max_tokens", None

    def message(ident: str, text: str | None, reason: str | None, seq: str | None, prompt: int, n: int
                ) -> dict[str, Any]:
        return {"id": ident, "type": "message", "role": "assistant", "model": model_id,
                "content": [] if text is None else [{"type": "text", "text": text}],
                "stop_reason": reason, "stop_sequence": seq,
                "usage": {"input_tokens": prompt, "output_tokens": n}}

    async def request_row(request: Request) -> tuple[dict[str, Any], dict[str, Any], int]:
        data = await json_object(request, guard, read_json)
        row = prompt_rows([{"messages": _conversation(data)}], limits, "messages")[0]
        (prompt_tokens,), _ = read_prompts(generator, [row], limits, "messages")
        return data, row, prompt_tokens

    @app.post(PATH, openapi_extra=MESSAGES_DOC)
    async def messages(request: Request) -> Any:
        """Anthropic's Messages API: one text block answering the conversation's last user turn."""
        data, row, prompt_tokens = await request_row(request)
        opts, stops = _options(data, limits)
        ident = f"msg_{uuid.uuid4().hex}"
        if data.get("stream"):
            read = open_stream(batcher, row, opts)

            def events(cancel: Any) -> Any:
                def event(kind: str, **fields: Any) -> str:
                    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n"

                yield event("message_start", message=message(ident, None, None, None, prompt_tokens, 0))
                yield event("content_block_start", index=0, content_block={"type": "text", "text": ""})
                yield event("ping")
                info: dict[str, Any] = {}
                scanner = StopScanner(stops)
                for text in scanner.relay(read(cancel, info)):
                    yield event("content_block_delta", index=0, delta={"type": "text_delta", "text": text})
                yield event("content_block_stop", index=0)
                answer = scanner.answer
                _, reason, seq = ended(stops, scanner.text, info.get("stopped", False))
                n = text_tokens(generator, answer) if seq is not None else info.get(
                    "tokens", text_tokens(generator, answer))
                yield event("message_delta", delta={"stop_reason": reason, "stop_sequence": seq},
                            usage={"output_tokens": n})
                yield event("message_stop")

            return threaded_stream(events)
        (c,) = await batcher.submit(request_items([row], opts))
        text, reason, seq = ended(stops, c.text, c.stopped)
        n = text_tokens(generator, text) if seq is not None else c.tokens
        return message(ident, text, reason, seq, prompt_tokens, n)

    @app.post(f"{PATH}/count_tokens", openapi_extra=COUNT_DOC)
    async def count_tokens(request: Request) -> Any:
        """The tokens of the conversation as the model reads it (its chat template and the run's instruction)."""
        _, _, prompt_tokens = await request_row(request)
        return {"input_tokens": prompt_tokens}
