"""OpenAI-compatible routes of a served run (``fmtune serve RUN``): the official ``openai`` clients, and
the tools built on them, talk to the fine-tuned model unchanged, with ``base_url="http://HOST:PORT/v1"``
(and the service's API key as theirs, if it has one).

    GET  /v1/models                 the one model served; its id is the run's name
    GET  /v1/models/{id}
    POST /v1/audio/transcriptions   speech recognition runs: multipart {file, model, language, response_format
                                     json or text} -> {"text": ...}, or the plain text
    POST /v1/embeddings             text runs whose head reads one pooled vector (classification,
                                     multi-label, regression; not pairs): {"model", "input": "..." or
                                     [...], "encoding_format": "float" or "base64"} -> the fine-tuned
                                     encoder's pooled features, L2-normalised (cosine = dot product); the
                                     same features at POST /pipeline/feature-extraction and POST /embed
                                     (Text Embeddings Inference's route)
    generation runs:
    POST /v1/chat/completions       {"model", "messages": [{role, content}, ...], "max_completion_tokens" or
                                     "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                                     "stream_options": {"include_usage"}}
    POST /v1/completions            {"model", "prompt": "..." or ["...", ...], the same options}: each prompt
                                     asked as training asked it (the run's instruction and chat template),
                                     as POST /generate does
    POST /v1/responses              the Responses API: {"model", "input": "..." or [messages], "instructions",
                                     "max_output_tokens", "temperature", "top_p", "stream"}: one message of
                                     output text; streamed as its typed events (response.output_text.delta ...);
                                     nothing is stored (no previous_response_id)

Answers, chunks (server-sent events ending ``data: [DONE]``), ``finish_reason`` ("stop": the model's
end of answer or a stop string; "length": the token limit) and ``usage`` (tokens of the prompt as
the model read it: a prompt longer than the model reads is cut, or refused with a 413 under
``--long-text reject``; and of the answer) have OpenAI's shapes, and so have errors:
``{"error": {"message", "type", "param", "code"}}``. Where this service differs, by design:

- ``temperature`` defaults to 0, greedy decoding as ``fmtune generate`` does (OpenAI's default is 1):
  the same request gets the same answer; send a temperature to sample;
- ``max_tokens`` defaults to the run's ``eval.max_new_tokens`` and may be at most the service's
  ``--max-new-tokens``;
- ``model`` may name anything (clients require the field; there is one model here); answers carry
  the run's name;
- what it cannot do is refused with a 422 that names the field, never ignored: ``n`` above 1,
  ``logprobs``, ``tools`` / ``functions``, a ``response_format`` other than text, non-zero penalties
  or ``logit_bias``, ``echo``, ``suffix``, token-id prompts, images in a message.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import Request

from fmtune.errors import DataError
from fmtune.serve_base import (
    HTTPError,
    Limits,
    check_items,
    json_object,
    number,
    open_stream,
    request_items,
    text_tokens,
    threaded_stream,
)

# request fields refused unless they carry their neutral value (None is always fine: a client's "not given")
NEUTRAL = {"n": (1,), "best_of": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,),
           "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "tools": ([],),
           "functions": ([],), "tool_choice": ("none",), "function_call": ("none",), "suffix": ("",)}
MAX_STOPS = 4  # as OpenAI's API


def body_doc(properties: dict[str, Any], required: list[str], example: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI request body of a /v1 route (for /docs and schema-driven clients)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": required, "properties": properties, "example": example}}}}}


TEXTS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
DECODING = {"model": {"type": "string", "description": "any name (one model is served)"},
            "max_tokens": {"type": "integer"}, "max_completion_tokens": {"type": "integer"},
            "temperature": {"type": "number", "description": "default 0: greedy"}, "top_p": {"type": "number"},
            "seed": {"type": "integer"}, "stop": TEXTS, "stream": {"type": "boolean"},
            "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}}}
_CHAT_MESSAGE = {"type": "object", "required": ["role", "content"],
                 "properties": {"role": {"type": "string"}, "content": {"type": "string"}}}
CHAT_DOC = body_doc({**DECODING, "messages": {"type": "array", "items": _CHAT_MESSAGE}},
                    ["model", "messages"], {"model": "run", "messages": [{"role": "user", "content": "Hello"}]})
COMPLETIONS_DOC = body_doc({**DECODING, "prompt": TEXTS}, ["model", "prompt"], {"model": "run", "prompt": "Hello"})
RESPONSES_DOC = body_doc({"model": DECODING["model"],
                          "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
                          "instructions": {"type": "string"}, "max_output_tokens": {"type": "integer"},
                          "temperature": DECODING["temperature"], "top_p": {"type": "number"},
                          "stream": {"type": "boolean"}},
                         ["model", "input"], {"model": "run", "input": "Hello"})
# Responses API fields refused unless neutral (what needs tools, state kept between requests or another output)
RESPONSES_NEUTRAL = {"tools": ([],), "previous_response_id": (), "conversation": (), "background": (False,),
                     "include": ([],), "reasoning": ({},), "tool_choice": ("none", "auto"), "max_tool_calls": (),
                     "prompt": (), "top_logprobs": (0,)}
EMBEDDINGS_DOC = body_doc({"model": DECODING["model"], "input": TEXTS,
                           "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                           "dimensions": {"type": "integer"}}, ["model", "input"],
                          {"model": "run", "input": ["a gripping, well-acted film"]})
FEATURE_EXTRACTION_DOC = body_doc({"inputs": TEXTS, "normalize": {"type": "boolean"},
                                   "truncate": {"type": "boolean"}, "dimensions": {"type": "integer"}}, ["inputs"],
                                  {"inputs": ["a gripping, well-acted film"], "normalize": True})


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = ("authentication_error" if status == 401 else "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _refuse_unsupported(data: dict[str, Any]) -> None:
    for key, neutral in NEUTRAL.items():
        if data.get(key) is not None and data[key] not in neutral:
            raise HTTPError(422, f"{key!r}: {data[key]!r} is not supported by this service (fmtune serves one "
                                 f"greedy or sampled answer per prompt); leave it out", param=key)
    fmt = data.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise HTTPError(422, "'response_format': only {\"type\": \"text\"} is supported", param="response_format")


def stop_strings(data: dict[str, Any]) -> list[str]:
    stop = data.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise HTTPError(422, f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them",
                        param="stop")
    return stops


def decoding_options(data: dict[str, Any], limits: Limits, max_field: str) -> dict[str, Any]:
    """The decoding options every generation route takes, in Generator's terms (the token limit under the
    route's own name, ``max_field``), each checked; and ``stream`` a boolean."""
    opts: dict[str, Any] = {}
    for name, field, kind, low, high in (("max_new_tokens", max_field, int, 1, limits.max_new_tokens),
                                         ("temperature", "temperature", float, 0.0, 2.0),
                                         ("top_p", "top_p", float, 0.0, 1.0), ("seed", "seed", int, 0, 2**31 - 1)):
        value = number(data, field, kind, low, high)
        if value is not None:
            opts[name] = value
    if data.get("stream") is not None and not isinstance(data["stream"], bool):
        raise HTTPError(422, f"'stream' must be true or false, got {data['stream']!r}", param="stream")
    return opts


def _options(data: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """Decoding options in Generator's terms (temperature 0, greedy, unless one is sent)."""
    _refuse_unsupported(data)
    key = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    opts = decoding_options(data, limits, key)
    if data.get("stream_options") is not None and not isinstance(data["stream_options"], dict):
        raise HTTPError(422, "'stream_options' must be an object, e.g. {\"include_usage\": true}",
                        param="stream_options")
    return opts


def chat_messages(value: Any) -> list[dict[str, str]]:
    """OpenAI chat messages as the run's chat reads them: text parts joined, "developer" as "system";
    the conversation ends with the user's turn (the answer is the model's)."""
    if not isinstance(value, list) or not value:
        raise HTTPError(422, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m:
            raise HTTPError(422, f"messages[{j}] must be an object with 'role' and 'content'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise HTTPError(422, f"messages[{j}]: only text content parts are supported (this model reads "
                                     "text)", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if m.get("tool_calls") or m["role"] in ("tool", "function"):
            raise HTTPError(422, f"messages[{j}]: tool calls and tool results are not supported", param="messages")
        if not isinstance(content, str):
            raise HTTPError(422, f"messages[{j}]: 'content' must be a string or a list of text parts",
                            param="messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    if out[-1]["role"] == "assistant":
        raise HTTPError(422, "the last message is the assistant's: end with the user's turn, which the model "
                             "answers", param="messages")
    return out


def prompt_rows(records: list[dict[str, Any]], limits: Limits, what: str) -> list[dict[str, Any]]:
    from fmtune.tasks.generation import check_row

    rows = []
    for i, rec in enumerate(records):
        try:
            row = check_row(rec, f"{what}[{i}]" if "prompt" in rec else what, None, None, with_targets=False)
        except DataError as e:
            raise HTTPError(422, str(e), param=what) from None
        text = row["prompt"] or row["messages"] or ""
        if len(text) > limits.max_text_chars:
            raise HTTPError(413, f"{what}: {len(text)} characters; the limit is {limits.max_text_chars}", param=what)
        rows.append(row)
    return rows


def read_prompts(generator: Any, rows: list[dict[str, Any]], limits: Limits, what: str) -> tuple[list[int], list[int]]:
    """(the tokens of each row's prompt as the model reads it, the positions of the prompts cut to fit). A prompt
    longer than the model reads (``Generator.prompt_room``) is cut as ``fmtune generate`` cuts it (a causal LM's
    start, an encoder-decoder's end), or refused with a 413 under ``--long-text reject``."""
    read, cut = [], []
    for i, row in enumerate(rows):
        ids, whole = generator.prompt_ids(row)
        if whole > len(ids):
            where = f"{what}[{i}]" if what == "prompt" else what
            if limits.long_text == "reject":
                raise HTTPError(413, f"{where}: {whole} tokens; this model reads at most {generator.prompt_room} "
                                f"(its max_length {generator.bundle.max_length}): send a shorter prompt",
                                param=what)
            cut.append(i)
        read.append(len(ids))
    return read, cut


def first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """Where the first of ``stops`` in ``text`` begins, and which it is; None where none is in it."""
    return min(((text.find(s), s) for s in stops if s in text), default=None)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first of ``stops`` in it; whether one was found."""
    hit = first_stop(text, stops)
    return (text[:hit[0]], True) if hit else (text, False)


class StopScanner:
    """Streamed pieces of text, held back only as long as they may be the start of a stop string, so
    that no stop string (nor part of one) reaches the client; leading whitespace dropped, as in the
    whole answer."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent, self.stopped = stops, "", 0, False

    def feed(self, piece: str) -> str:
        self.text += piece
        if not self.sent:
            self.text = self.text.lstrip()
        head, self.stopped = cut_at_stop(self.text, self.stops)
        if self.stopped:
            return self._send(len(head))
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._send(len(self.text) - hold)

    def flush(self) -> str:
        return "" if self.stopped else self._send(len(self.text))

    def relay(self, pieces: Any) -> Any:
        """The text of ``pieces`` (a ``Generator.stream``) as it may be sent, the rest at the end; at a
        stop string the stream is closed, so the decoding stops at the next token."""
        try:
            for piece in pieces:
                text = self.feed(piece)
                if text:
                    yield text
                if self.stopped:
                    break
        finally:
            pieces.close()
        rest = self.flush()
        if rest:
            yield rest

    @property
    def answer(self) -> str:
        """What was sent: the answer up to its stop string."""
        return self.text[:self.sent]

    def _send(self, upto: int) -> str:
        out = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return out


def _response_messages(data: dict[str, Any]) -> list[dict[str, str]]:
    """The Responses API's ``instructions`` and ``input`` (a string, or messages whose content is a
    string or input_text / output_text parts) as chat messages."""
    value = data.get("input")
    if isinstance(value, str):
        items: list[Any] = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value:
        items = []
        for j, item in enumerate(value):
            if not isinstance(item, dict) or item.get("type", "message") != "message" or "role" not in item:
                kind = item.get("type") if isinstance(item, dict) else type(item).__name__
                raise HTTPError(422, f"input[{j}]: only messages ({{\"role\", \"content\"}}) are supported, not "
                                     f"{kind!r}", param="input")
            content = item.get("content")
            if isinstance(content, list):
                if any(not isinstance(x, dict) or x.get("type") not in ("input_text", "output_text") for x in content):
                    raise HTTPError(422, f"input[{j}]: only input_text / output_text parts are supported (this model "
                                         "reads text)", param="input")
                content = [{"type": "text", "text": x.get("text", "")} for x in content]
            items.append({"role": item["role"], "content": content})
    else:
        raise HTTPError(422, "'input' must be a non-empty string or a list of messages", param="input")
    instructions = data.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise HTTPError(422, "'instructions' must be a string", param="instructions")
    if instructions:  # as OpenAI reads them: a system (developer) message before the input
        items = [{"role": "system", "content": instructions}] + items
    try:
        return chat_messages(items)
    except HTTPError as e:
        raise HTTPError(e.status, e.message.replace("messages[", "input[").replace("'messages'", "'input'"),
                        param="input") from None


def _response_options(data: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """Decoding options of a Responses API request (temperature 0, greedy, unless one is sent)."""
    for key, neutral in RESPONSES_NEUTRAL.items():
        if data.get(key) is not None and data[key] not in neutral:
            raise HTTPError(422, f"{key!r} is not supported by this service (one answer of text per request, "
                                 "nothing stored between requests); leave it out", param=key)
    fmt = (data.get("text") or {}).get("format") if isinstance(data.get("text"), dict) else data.get("text")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise HTTPError(422, "'text.format': only {\"type\": \"text\"} is supported", param="text")
    return decoding_options(data, limits, "max_output_tokens")


def add_model_routes(app: Any, run_dir: Any, guard: Any) -> str:
    """GET /v1/models and /v1/models/{id}: the one model served, named by its run, in OpenAI's shape and
    Anthropic's at once (each client reads its own fields: ``display_name``, ``created_at``, ``has_more`` ...).
    Returns the name."""
    import datetime

    model_id = run_dir.name
    created = int(run_dir.stat().st_mtime)
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "fmtune", "type": "model",
            "display_name": model_id,
            "created_at": datetime.datetime.fromtimestamp(created, datetime.timezone.utc).isoformat()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        guard(request)
        return {"object": "list", "data": [card], "has_more": False, "first_id": model_id, "last_id": model_id}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        guard(request)
        if name != model_id:
            raise HTTPError(404, f"the model {name!r} is not served here; this service serves {model_id!r}",
                            param="model")
        return card

    return model_id


def _inputs(data: dict[str, Any], key: str, limits: Limits) -> list[Any]:
    """``data[key]``: a string or a list of them (token-id lists refused), checked against the limits."""
    if key not in data:
        raise HTTPError(422, f"{key!r} is missing: a string or a list of strings", param=key)
    try:
        items = check_items(data[key], limits)
    except HTTPError as e:
        raise HTTPError(e.status, e.message.replace("'inputs'", repr(key)), param=key) from None
    for i, v in enumerate(items):
        if not isinstance(v, str) or not v.strip():
            what = "token ids" if isinstance(v, (int, list)) else repr(v)
            raise HTTPError(422, f"{key}[{i}]: {what}: send non-empty strings (token-id {key}s are not supported)",
                            param=key)
        if len(v) > limits.max_text_chars:
            raise HTTPError(413, f"{key}[{i}]: {len(v)} characters; the limit is {limits.max_text_chars}", param=key)
    return items


def add_embedding_routes(app: Any, predictor: Any, limits: Limits, guard: Any, read_json: Any) -> None:
    """POST /v1/embeddings (and the model routes) for a text run whose head reads one pooled vector:
    the fine-tuned encoder's pooled features, L2-normalised as OpenAI's embeddings are."""
    import base64

    from starlette.concurrency import run_in_threadpool

    model_id = add_model_routes(app, predictor.run_dir, guard)

    @app.post("/v1/embeddings", openapi_extra=EMBEDDINGS_DOC)
    async def embeddings(request: Request) -> Any:
        """OpenAI's embeddings: one vector per input text."""
        guard(request)
        data = await read_json(request)
        if not isinstance(data, dict):
            raise HTTPError(422, "expected a JSON object")
        _require_torch(predictor)
        texts = _inputs(data, "input", limits)
        fmt = data.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise HTTPError(422, f"'encoding_format' must be float or base64, got {fmt!r}", param="encoding_format")

        vectors, used = await run_in_threadpool(_embedded, predictor, texts, True)
        if data.get("dimensions") is not None and data["dimensions"] != vectors.shape[1]:
            raise HTTPError(422, f"'dimensions': this model's embeddings have {vectors.shape[1]} (they are not "
                                 "shortened)", param="dimensions")
        rows = [base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()
                for v in vectors]
        return {"object": "list", "model": model_id, "usage": {"prompt_tokens": used, "total_tokens": used},
                "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(rows)]}

    @app.post("/pipeline/feature-extraction", openapi_extra=FEATURE_EXTRACTION_DOC)
    @app.post("/embed", openapi_extra=FEATURE_EXTRACTION_DOC)
    async def feature_extraction(request: Request) -> Any:
        """The Hugging Face Inference API's feature extraction (huggingface_hub's
        ``InferenceClient(model=URL + "/pipeline/feature-extraction").feature_extraction``), and Text Embeddings
        Inference's POST /embed (what its clients call: LlamaIndex's TextEmbeddingsInference, LangChain's ...):
        {"inputs": a text or a list, "normalize": true (the default), "truncate"} -> a list of vectors, one per
        text."""
        guard(request)
        data = await read_json(request)
        if not isinstance(data, dict) or "inputs" not in data:
            raise HTTPError(422, 'expected {"inputs": a text or a list of texts} (the Hugging Face Inference API)')
        params = {**(data.get("parameters") or {}), **{k: v for k, v in data.items() if k != "parameters"}}
        if params.get("prompt_name") is not None:
            raise HTTPError(422, "prompt_name is not supported by this run (its encoder takes no prompts)")
        if params.get("encoding_format") not in (None, "float"):
            raise HTTPError(422, f"encoding_format: only float is given, not {params['encoding_format']!r}")
        _require_torch(predictor)
        texts = _inputs(data, "inputs", limits)
        normalize = params.get("normalize")
        vectors, _ = await run_in_threadpool(_embedded, predictor, texts, normalize is None or bool(normalize),
                                             params.get("truncate") is False)
        if params.get("dimensions") is not None and params["dimensions"] != vectors.shape[1]:
            raise HTTPError(422, f"dimensions: this model's embeddings have {vectors.shape[1]} (they are not "
                                 "shortened)")
        return vectors.tolist()


def _require_torch(predictor: Any) -> None:
    """Embeddings come from the torch model: an exported backend gives predictions only (501)."""
    if predictor.backend != "torch":
        raise HTTPError(501, f"this service runs the {predictor.backend} export, which gives predictions, not "
                             "embeddings: serve the run with --backend torch")


def _embedded(predictor: Any, texts: list[str], normalize: bool, whole: bool = False) -> tuple[Any, int]:
    """The run's pooled features of ``texts`` (L2-normalised with ``normalize``) and the tokens they used;
    ``whole``: a text longer than the model reads is an error (413), not cut."""
    import numpy as np

    tok, n = predictor.bundle.tokenizer, predictor.bundle.max_length
    lengths = [len(ids) for ids in tok(texts, truncation=not whole, max_length=n)["input_ids"]]
    if whole and max(lengths) > n:
        i = int(np.argmax(lengths))
        raise HTTPError(413, f"inputs[{i}]: {lengths[i]} tokens; the model reads {n} (truncate: false)")
    feats, _ = predictor.embed(texts)
    if normalize:
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    return feats, sum(min(x, n) for x in lengths)


TRANSCRIPT_FORMATS = ("json", "text")


def _language_code(name: str) -> str:
    """A Whisper language name or code ("english", "English", "en") as its code; unknown ones as given."""
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    name = name.strip().lower()
    return TO_LANGUAGE_CODE.get(name, name)


def add_transcription_routes(app: Any, predictor: Any, batcher: Any, limits: Limits, guard: Any) -> None:
    """POST /v1/audio/transcriptions (and the model routes) for a speech recognition run: OpenAI's
    audio API (multipart: file, model, language, response_format json or text); the clips of
    concurrent requests share forward passes (the service's micro-batcher), as on POST /predict."""
    from fastapi.responses import PlainTextResponse
    from starlette.concurrency import run_in_threadpool

    from fmtune.tasks.speech import whisper_vocabulary

    add_model_routes(app, predictor.run_dir, guard)
    language = predictor.task.language or "english"  # what the run transcribes (task.language)
    # a language hint is checked where the run's language is known: a Whisper model's (task.language); another model
    # (Moonshine, a CTC model) transcribes the language it was trained on, which the run does not record
    known = bool(predictor.task.language) or whisper_vocabulary(predictor.bundle.tokenizer)
    doc = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "model"], "properties": {
            "file": {"type": "string", "format": "binary"}, "model": {"type": "string"},
            "language": {"type": "string"}, "response_format": {"type": "string", "enum": list(TRANSCRIPT_FORMATS)},
            "temperature": {"type": "number"}, "prompt": {"type": "string"}}}}}}}

    @app.post("/v1/audio/transcriptions", openapi_extra=doc)
    async def transcriptions(request: Request) -> Any:
        """OpenAI's transcriptions: the text of one audio file (wav, flac, ogg, mp3: what soundfile reads)."""
        guard(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPError(422, "send the audio as multipart/form-data with a 'file' field (as the openai "
                                 "clients do)", param="file")
        form = await request.form(max_files=2)
        upload = form.get("file")
        if upload is None or not hasattr(upload, "read"):
            raise HTTPError(422, "'file' is missing: the audio file to transcribe", param="file")
        fmt = str(form.get("response_format") or "json")
        if fmt not in TRANSCRIPT_FORMATS:
            raise HTTPError(422, f"'response_format': {fmt!r} is not supported (one of: {', '.join(TRANSCRIPT_FORMATS)}"
                                 "; the transcript has no timestamps)", param="response_format")
        asked = form.get("language")
        if asked and known and _language_code(str(asked)) != _language_code(language):
            raise HTTPError(422, f"'language': {asked!r}, but this run transcribes {language} (its task.language); "
                                 "leave it out", param="language")
        if form.get("prompt"):
            raise HTTPError(422, "'prompt' (text to condition the transcript on) is not supported; leave it out",
                            param="prompt")
        if form.get("temperature") not in (None, "", "0", "0.0"):
            raise HTTPError(422, "'temperature': transcripts are decoded greedily here; leave it out or send 0",
                            param="temperature")
        if form.getlist("timestamp_granularities[]"):
            raise HTTPError(422, "'timestamp_granularities': the transcript has no timestamps",
                            param="timestamp_granularities")
        raw = await upload.read()
        try:
            clip = await run_in_threadpool(predictor.decode, raw, f"file {upload.filename or ''}".strip())
        except DataError as e:
            raise HTTPError(422, str(e), param="file") from None
        (record,) = await batcher.submit([clip])
        if fmt == "text":
            return PlainTextResponse(record["transcript"] + "\n")
        seconds = len(clip) / float(predictor.bundle.audio["sampling_rate"])
        return {"text": record["transcript"], "usage": {"type": "duration", "seconds": round(seconds, 3)}}


def add_routes(app: Any, generator: Any, limits: Limits, guard: Any, read_json: Any, batcher: Any) -> None:
    """The /v1 routes on ``app``, answering with ``generator`` (a ``fmtune.generation.Generator``):
    whole answers through ``batcher`` (concurrent greedy requests decoded together, as on POST
    /generate), streams in the same batches (``serve_base.open_stream``)."""
    model_id = add_model_routes(app, generator.run_dir, guard)

    def usage(prompt: int, answer: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}

    def tokens(text: str) -> int:
        return text_tokens(generator, text)

    async def body(request: Request) -> dict[str, Any]:
        return await json_object(request, guard, read_json)

    def finish(stopped: bool) -> str:
        return "stop" if stopped else "length"

    async def answer_all(rows: list[dict[str, Any]], opts: dict[str, Any], stops: list[str]) -> list[tuple]:
        """(text, finish_reason, completion tokens) of each row."""
        out = []
        for c in await batcher.submit(request_items(rows, opts)):
            text, cut = cut_at_stop(c.text, stops)
            out.append((text, finish(cut or c.stopped), tokens(text) if cut else c.tokens))
        return out

    def stream(row: dict[str, Any], opts: dict[str, Any], stops: list[str], chunk: Any, data: dict[str, Any],
               prompt_tokens: int) -> Any:
        """Server-sent events: ``chunk(text, finish_reason)`` per piece, then the usage if asked for,
        then [DONE]. The answer is decoded in a worker thread; the client going away stops it."""
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))

        read = open_stream(batcher, row, opts)

        def events(cancel: Any) -> Any:
            info: dict[str, Any] = {}
            scanner = StopScanner(stops)
            first = chunk(None, None)
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            for text in scanner.relay(read(cancel, info)):
                yield f"data: {json.dumps(chunk(text, None))}\n\n"
            answer = scanner.answer
            yield f"data: {json.dumps(chunk('', finish(scanner.stopped or info.get('stopped', False))))}\n\n"
            if include_usage:
                n = tokens(answer) if scanner.stopped else info.get("tokens", tokens(answer))
                yield f"data: {json.dumps(chunk(None, None, usage(prompt_tokens, n)))}\n\n"
            yield "data: [DONE]\n\n"

        return threaded_stream(events)

    @app.post("/v1/chat/completions", openapi_extra=CHAT_DOC)
    async def chat_completions(request: Request) -> Any:
        """OpenAI's chat completions: the answer to the conversation's last user turn."""
        data = await body(request)
        opts, stops = _options(data, limits), stop_strings(data)
        messages = chat_messages(data.get("messages"))
        # asked as training asked (tasks.generation.prompt_ids): the run's instruction before the first user turn
        row = prompt_rows([{"messages": messages}], limits, "messages")[0]
        (prompt_tokens,), _ = read_prompts(generator, [row], limits, "messages")
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if data.get("stream"):
            def chunk(text: str | None, reason: str | None, used: dict | None = None) -> dict[str, Any]:
                base = {"id": ident, "object": "chat.completion.chunk", "created": now, "model": model_id}
                if used is not None:
                    return {**base, "choices": [], "usage": used}
                delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
                return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

            return stream(row, opts, stops, chunk, data, prompt_tokens)
        (text, reason, n), = await answer_all([row], opts, stops)
        return {"id": ident, "object": "chat.completion", "created": now, "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                             "logprobs": None, "finish_reason": reason}],
                "usage": usage(prompt_tokens, n), "system_fingerprint": generator.version}

    @app.post("/v1/responses", openapi_extra=RESPONSES_DOC)
    async def responses(request: Request) -> Any:
        """OpenAI's Responses API: one message of output text answering the input (a string, or a
        conversation ending with the user's turn), asked as training asked (the run's instruction and
        chat template). Nothing is stored: each request stands alone."""
        data = await body(request)
        opts = _response_options(data, limits)
        row = prompt_rows([{"messages": _response_messages(data)}], limits, "input")[0]
        (prompt_tokens,), _ = read_prompts(generator, [row], limits, "input")
        ident, item_id, now = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", int(time.time())

        def response(text: str | None, reason: str | None, n: int = 0) -> dict[str, Any]:
            """The response object: in progress (``text`` None), or done with the answer and its usage."""
            done = text is not None
            part = {"type": "output_text", "text": text, "annotations": []}
            item = {"type": "message", "id": item_id, "status": "completed", "role": "assistant", "content": [part]}
            return {"id": ident, "object": "response", "created_at": now, "model": model_id,
                    "status": ("completed" if reason == "stop" else "incomplete") if done else "in_progress",
                    "incomplete_details": {"reason": "max_output_tokens"} if reason == "length" else None,
                    "output": [item] if done else [], "error": None, "instructions": data.get("instructions"),
                    "max_output_tokens": data.get("max_output_tokens"), "temperature": opts.get("temperature", 0.0),
                    "top_p": opts.get("top_p", 1.0), "tools": [], "tool_choice": "auto", "parallel_tool_calls": True,
                    "text": {"format": {"type": "text"}}, "metadata": data.get("metadata") or {}, "store": False,
                    "usage": {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens": n, "output_tokens_details": {"reasoning_tokens": 0},
                              "total_tokens": prompt_tokens + n} if done else None}

        if data.get("stream"):
            read = open_stream(batcher, row, opts)

            def events(cancel: Any) -> Any:
                seq = iter(range(1 << 30))

                def event(kind: str, **fields: Any) -> str:
                    payload = {"type": kind, "sequence_number": next(seq), **fields}
                    return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

                where = {"item_id": item_id, "output_index": 0, "content_index": 0}
                yield event("response.created", response=response(None, None))
                yield event("response.in_progress", response=response(None, None))
                yield event("response.output_item.added", output_index=0, item={
                    "type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []})
                yield event("response.content_part.added", **where,
                            part={"type": "output_text", "text": "", "annotations": []})
                info: dict[str, Any] = {}
                scanner = StopScanner([])
                for text in scanner.relay(read(cancel, info)):
                    yield event("response.output_text.delta", **where, delta=text, logprobs=[])
                text = scanner.answer
                done = response(text, finish(info.get("stopped", False)), info.get("tokens", tokens(text)))
                yield event("response.output_text.done", **where, text=text, logprobs=[])
                yield event("response.content_part.done", **where, part=done["output"][0]["content"][0])
                yield event("response.output_item.done", output_index=0, item=done["output"][0])
                yield event("response.completed" if done["status"] == "completed" else "response.incomplete",
                            response=done)

            return threaded_stream(events)
        (text, reason, n), = await answer_all([row], opts, [])
        return response(text, reason, n)

    @app.post("/v1/completions", openapi_extra=COMPLETIONS_DOC)
    async def completions(request: Request) -> Any:
        """OpenAI's (legacy) completions: each prompt asked as the run was trained to be asked."""
        data = await body(request)
        opts, stops = _options(data, limits), stop_strings(data)
        rows = prompt_rows([{"prompt": p} for p in _inputs(data, "prompt", limits)], limits, "prompt")
        prompt_tokens, _ = read_prompts(generator, rows, limits, "prompt")
        ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": ident, "object": "text_completion", "created": now, "model": model_id}
        if data.get("stream"):
            if len(rows) > 1:
                raise HTTPError(422, "stream answers one prompt at a time; send one prompt, or stream: false",
                                param="stream")

            def chunk(text: str | None, reason: str | None, used: dict | None = None) -> dict[str, Any] | None:
                if used is not None:
                    return {**base, "choices": [], "usage": used}
                if text is None:  # no role chunk in this API
                    return None
                return {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}

            return stream(rows[0], opts, stops, chunk, data, prompt_tokens[0])
        answers = await answer_all(rows, opts, stops)
        return {**base, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                                    for i, (text, reason, _) in enumerate(answers)],
                "usage": usage(sum(prompt_tokens), sum(n for *_, n in answers)),
                "system_fingerprint": generator.version}
