"""Ollama's API for a served generation run (``fmtune serve RUN``): the ``ollama`` clients, and what is built on them
(LangChain's ChatOllama, Open WebUI ...), talk to the fine-tuned model unchanged with ``host="http://HOST:PORT"``.

    POST /api/generate   {"model", "prompt", "system", "stream", "options": {"num_predict", "temperature", "top_p",
                          "seed", "stop"}}: the prompt asked as training asked it (as POST /generate)
    POST /api/chat       {"model", "messages": [{role, content}, ...], "stream", "options"}: the answer to the last
                          user turn
    GET  /api/tags       the one model served (its name is the run's)
    POST /api/show       its details
    GET  /api/version

Answers have Ollama's shapes: ``response`` (generate) or ``message`` (chat), ``done``, ``done_reason`` ("stop": the
model's end of answer or a stop string; "length": the token limit), ``prompt_eval_count`` / ``eval_count`` (tokens
of the prompt as the model read it and of the answer) and durations in nanoseconds. ``stream`` defaults to true, as
Ollama's: the answer as JSON lines, one a piece (``"done": false``), the last with ``"done": true`` and the counts.
Errors are ``{"error": "..."}`` with a 4xx status. Where this service differs, by design:

- ``temperature`` defaults to 0, greedy decoding as ``fmtune generate`` does (Ollama's default is 0.8): the same
  request gets the same answer; send a temperature to sample;
- ``num_predict`` defaults to the run's ``eval.max_new_tokens`` and may be at most the service's
  ``--max-new-tokens``;
- ``model`` may name anything (clients require the field; there is one model here);
- options of how a model is loaded (``num_ctx``, ``num_gpu``, ``num_thread`` ...) are not this service's to set and
  are let be; what changes an answer and it cannot do is refused with a 422 naming it, never ignored: ``top_k``,
  penalties, mirostat, ``format`` (JSON output), images, tools, ``think``, ``suffix``, ``raw``, ``context``.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from fastapi import Request

from fmtune import serve_openai
from fmtune.serve_base import HTTPError, Limits, json_object, open_stream, text_tokens, threaded_stream

# Ollama's options of how a model is loaded and run, not of what it answers: let be
LOAD_OPTIONS = {"numa", "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
                "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep"}
# request fields refused unless they carry their neutral value (None, a client's "not given", is always fine)
NEUTRAL = {"format": ("",), "images": ([],), "tools": ([],), "think": (False,), "suffix": ("",), "raw": (False,),
           "context": ([],), "template": ("",), "logprobs": (False,), "top_logprobs": (0,)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _options(data: dict[str, Any], limits: Limits) -> tuple[dict[str, Any], list[str]]:
    """The decoding options of a request in Generator's terms, and its stop strings, checked (HTTPError 422)."""
    for key, neutral in NEUTRAL.items():
        if data.get(key) is not None and data[key] not in neutral:
            raise HTTPError(422, f"{key!r} is not supported by this service (fmtune serves one answer of text per "
                                 "prompt); leave it out")
    if data.get("stream") is not None and not isinstance(data["stream"], bool):
        raise HTTPError(422, f"'stream' must be true or false, got {data['stream']!r}")
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise HTTPError(422, "'options' must be an object, e.g. {\"temperature\": 0.7, \"num_predict\": 64}")
    other = [k for k, v in options.items() if v is not None and k not in LOAD_OPTIONS
             and k not in ("num_predict", "temperature", "top_p", "seed", "stop")]
    if other:
        raise HTTPError(422, f"options.{other[0]} is not supported by this service (it takes num_predict, "
                             "temperature, top_p, seed and stop)")
    if options.get("num_predict") in (-1, -2):  # (Ollama's "no limit" / "fill the context": the service's own)
        options = {k: v for k, v in options.items() if k != "num_predict"}
    opts = serve_openai.decoding_options(options, limits, "num_predict")  # (OpenAI's bounds, Ollama's limit's name)
    try:
        stops = serve_openai.stop_strings({"stop": options.get("stop")})
    except HTTPError:
        raise HTTPError(422, f"options.stop must be a list of at most {serve_openai.MAX_STOPS} non-empty "
                             "strings") from None
    return opts, stops


def add_routes(app: Any, generator: Any, limits: Limits, guard: Any, read_json: Any, batcher: Any) -> None:
    """Ollama's routes on ``app``, answering with ``generator`` (a ``fmtune.generation.Generator``) through
    ``batcher`` as the other generation routes do: concurrent requests decoded together, streams in the same
    batches."""
    model_id = generator.run_dir.name
    modified = datetime.fromtimestamp(generator.run_dir.stat().st_mtime, timezone.utc).isoformat()
    config = getattr(generator.bundle.model, "config", None)
    details = {"parent_model": "", "format": "safetensors", "family": getattr(config, "model_type", "") or "",
               "families": [getattr(config, "model_type", "") or ""],
               "parameter_size": f"{sum(p.numel() for p in generator.bundle.model.parameters()) / 1e6:.0f}M"
               if hasattr(generator.bundle.model, "parameters") else "", "quantization_level": ""}

    def tokens(text: str) -> int:
        return text_tokens(generator, text)

    async def body(request: Request) -> dict[str, Any]:
        return await json_object(request, guard, read_json)

    async def answer(row: dict[str, Any], data: dict[str, Any], what: str, piece: Any) -> Any:
        """The answer to ``row``: one object (``piece(text)`` with the counts), or with "stream" (Ollama's
        default) JSON lines of ``piece(text)``, the last done with the counts."""
        opts, stops = _options(data, limits)
        (prompt_tokens,), _ = serve_openai.read_prompts(generator, [row], limits, what)
        started = time.perf_counter_ns()

        def done(text: str, stopped: bool, n: int) -> dict[str, Any]:
            took = time.perf_counter_ns() - started
            return {**piece(text), "done": True, "done_reason": "stop" if stopped else "length",
                    "total_duration": took, "load_duration": 0, "prompt_eval_count": prompt_tokens,
                    "prompt_eval_duration": 0, "eval_count": n, "eval_duration": took}

        if data.get("stream", True):
            read = open_stream(batcher, row, opts)

            def lines(cancel: Any) -> Any:
                info: dict[str, Any] = {}
                scanner = serve_openai.StopScanner(stops)
                for text in scanner.relay(read(cancel, info)):
                    yield json.dumps({**piece(text), "done": False}) + "\n"
                n = tokens(scanner.answer) if scanner.stopped else info.get("tokens", tokens(scanner.answer))
                yield json.dumps(done("", scanner.stopped or info.get("stopped", False), n)) + "\n"

            return threaded_stream(lines, media_type="application/x-ndjson")
        (c,) = await batcher.submit([(row, opts)])
        text, cut = serve_openai.cut_at_stop(c.text, stops)
        return done(text, cut or c.stopped, tokens(text) if cut else c.tokens)

    @app.post("/api/generate", openapi_extra=GENERATE_DOC)
    async def generate(request: Request) -> Any:
        """Ollama's generate: the answer to a prompt (with "system", asked as a chat of that system turn and
        the prompt)."""
        data = await body(request)
        prompt, system = data.get("prompt"), data.get("system")
        if not isinstance(prompt, str) or not prompt.strip():
            raise HTTPError(422, "'prompt' must be a non-empty string (this service does not load or unload "
                                 "models: an empty prompt asks for nothing)")
        if system is not None and not isinstance(system, str):
            raise HTTPError(422, "'system' must be a string")
        record = ({"messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}]}
                  if system else {"prompt": prompt})
        row = serve_openai.prompt_rows([record], limits, "prompt" if not system else "messages")[0]
        return await answer(row, data, "prompt" if not system else "messages",
                            lambda text: {"model": model_id, "created_at": _now(), "response": text})

    @app.post("/api/chat", openapi_extra=CHAT_DOC)
    async def chat(request: Request) -> Any:
        """Ollama's chat: the answer to the conversation's last user turn."""
        data = await body(request)
        messages = serve_openai.chat_messages(data.get("messages"))
        row = serve_openai.prompt_rows([{"messages": messages}], limits, "messages")[0]
        return await answer(row, data, "messages", lambda text: {
            "model": model_id, "created_at": _now(), "message": {"role": "assistant", "content": text}})

    @app.get("/api/tags")
    async def tags(request: Request) -> dict[str, Any]:
        guard(request)
        return {"models": [{"name": model_id, "model": model_id, "modified_at": modified,
                            "size": sum(f.stat().st_size for f in (generator.run_dir / "model").rglob("*")
                                        if f.is_file()) if (generator.run_dir / "model").is_dir() else 0,
                            "digest": generator.version, "details": details}]}

    @app.post("/api/show", openapi_extra=SHOW_DOC)
    async def show(request: Request) -> dict[str, Any]:
        data = await body(request)
        name = data.get("model") or data.get("name")
        if name not in (None, model_id, f"{model_id}:latest"):
            raise HTTPError(404, f"model {name!r} not found; this service serves {model_id!r}")
        return {"modelfile": "", "parameters": "", "template": "", "details": details, "modified_at": modified,
                "model_info": {"general.architecture": details["family"]}, "capabilities": ["completion"]}

    @app.get("/api/version")
    async def version() -> dict[str, str]:
        from fmtune import __version__

        return {"version": __version__}


_OPTIONS = {"type": "object", "properties": {
    "num_predict": {"type": "integer"}, "temperature": {"type": "number"}, "top_p": {"type": "number"},
    "seed": {"type": "integer"}, "stop": {"type": "array", "items": {"type": "string"}}}}
GENERATE_DOC = serve_openai.body_doc(
    {"model": {"type": "string"}, "prompt": {"type": "string"}, "system": {"type": "string"},
     "stream": {"type": "boolean"}, "options": _OPTIONS},
    ["model", "prompt"], {"model": "run", "prompt": "Write a haiku about autumn.", "stream": False})
CHAT_DOC = serve_openai.body_doc(
    {"model": {"type": "string"}, "messages": {"type": "array", "items": {"type": "object"}},
     "stream": {"type": "boolean"}, "options": _OPTIONS},
    ["model", "messages"], {"model": "run", "messages": [{"role": "user", "content": "Hello!"}], "stream": False})
SHOW_DOC = serve_openai.body_doc({"model": {"type": "string"}}, ["model"], {"model": "run"})
