"""``fmtune serve``: a trained run as an HTTP service (FastAPI + uvicorn).

    POST /predict   {"inputs": ["text", ...]}            text runs
                    {"inputs": ["<base64>", ...]}         image and audio runs (base64 of the file), or
                                                          multipart files (field "files")
                    -> {"predictions": [...], "model_version": "..."}
    POST /generate  {"prompt": "...", "max_new_tokens": 64, "stream": true}  generation runs: the answer,
                    or with stream server-sent events of its pieces
    /v1/...         OpenAI-compatible, for the openai clients (base_url http://HOST:PORT/v1;
                    ``fmtune.serve_openai``): generation runs chat completions, completions and models;
                    text runs with one pooled vector (classification, multi-label, regression) embeddings;
                    speech recognition runs audio transcriptions
    POST /v1/messages  Anthropic's Messages API for generation runs (the anthropic clients, base_url
                    http://HOST:PORT; ``fmtune.serve_anthropic``)
    POST /          the Hugging Face Inference API's format (huggingface_hub's InferenceClient(model=URL)):
                    {"inputs": ..., "parameters": {...}} or a file as the body; each task formats its answer
                    (``Task.hf_output``); generation runs as TGI: [{"generated_text": ...}]
    /v2/...         the Open Inference Protocol (KServe v2, Triton, MLServer: ``fmtune.serve_v2``), JSON and
                    Triton's binary tensors, for tritonclient and KServe's clients
    GET  /health    liveness, no key needed
    GET  /metadata  model, task, labels, strategy, test metrics at training time, service limits
    GET  /docs      OpenAPI documentation

Requests that arrive while a forward pass runs are gathered (up to ``max_batch`` items) into
the next one; ``max_wait_ms`` makes a batch that is not full wait that much longer for more.
Bad input is a 4xx with a JSON ``{"error": ...}`` body, never a 500, and the service goes on:
malformed JSON (400), missing key (401), wrong types, an empty list or an input that is not an
image / audio file the model can read (422), a body, item count or text over its limit (413).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import time
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from fmtune import serve_anthropic, serve_ollama, serve_openai, serve_v2
from fmtune.data import tabular
from fmtune.errors import ConfigError, DataError
from fmtune.serve_base import HTTPError, Limits, check_items, number, open_stream, request_items, threaded_stream
from fmtune.tasks.base import Task


class MicroBatcher:
    """Gathers the items of concurrent requests into one call of ``run`` (items -> one result each, in
    order) at a time: one forward pass of a predictor, or one batched decoding of a generation run."""

    def __init__(self, run: Any, limits: Limits):
        self.run, self.limits = run, limits
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.stats = {"requests": 0, "items": 0, "batches": 0}

    async def submit(self, items: list[Any]) -> list[dict[str, Any]]:
        if self.worker is None or self.worker.done():
            self.queue = asyncio.Queue()
            self.worker = asyncio.create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((items, future))
        return await future

    async def _run(self) -> None:
        assert self.queue is not None
        while True:
            jobs = [await self.queue.get()]
            n = len(jobs[0][0])
            # everything that queued up while the previous forward pass ran joins this one; with
            # max_wait_ms, a batch that is not full also waits that long for more
            deadline = time.monotonic() + self.limits.max_wait_ms / 1000
            while n < self.limits.max_batch:
                if not self.queue.empty():
                    job = self.queue.get_nowait()
                else:
                    timeout = deadline - time.monotonic()
                    if timeout <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self.queue.get(), timeout)
                    except asyncio.TimeoutError:
                        break
                jobs.append(job)
                n += len(job[0])
            items = [x for job, _ in jobs for x in job]
            try:
                results = await asyncio.to_thread(self.run, items)
            except Exception as e:  # a failure of the model, not of the input: every waiting request learns it
                for _, fut in jobs:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.stats["batches"] += 1
            self.stats["requests"] += len(jobs)
            self.stats["items"] += len(items)
            start = 0
            for job, fut in jobs:
                if not fut.done():
                    fut.set_result(results[start:start + len(job)])
                start += len(job)

    async def close(self) -> None:
        if self.worker is not None:
            self.worker.cancel()


def _row_text(value: dict[str, Any], predictor: Any, where: str) -> Any:
    """A JSON object input: a table row. Its text is its text key, or (a tabular run) the row
    written out as the run's data.text_columns / text_template say."""
    import pandas as pd

    from fmtune.data import tabular

    cfg = predictor.config.data
    if getattr(predictor, "pair_column", None):  # a run on pairs: the two texts by their columns' names
        missing = [k for k in (cfg.text_column, predictor.pair_column) if k not in value]
        if missing and "text" in value and "text_pair" in value:  # as transformers' pipeline takes a pair
            return value["text"], value["text_pair"]
        if missing:
            raise DataError(f"{where}: an object input needs the keys {cfg.text_column!r} and "
                            f"{predictor.pair_column!r} (the two texts of the pair; or 'text' and 'text_pair'); "
                            f"{missing[0]!r} is missing")
        return value[cfg.text_column], value[predictor.pair_column]
    if tabular.uses_columns(cfg):
        row = pd.DataFrame([value])
        row.attrs["source"] = where
        return tabular.render(row, cfg)[cfg.text_column].iloc[0]
    if cfg.text_column not in value:
        raise DataError(f"{where}: an object input needs the key {cfg.text_column!r} (the text)")
    return value[cfg.text_column]


def _prepare_texts(values: list[Any], predictor: Any, limits: Limits) -> tuple[list[str], list[int], list[dict]]:
    """(texts, positions truncated, the group values of each input where the run decides per group)."""
    texts, truncated, groups = [], [], []
    rules = getattr(predictor, "thresholds", None)
    for i, v in enumerate(values):
        try:
            if rules is not None:
                if not isinstance(v, dict) or any(c not in v for c in rules["columns"]):
                    raise DataError(f"inputs[{i}]: this run decides with per-group thresholds on "
                                    f"{', '.join(rules['columns'])}: send objects with those keys, e.g. "
                                    f"{{\"{predictor.config.data.text_column}\": ..., \"{rules['columns'][0]}\": ...}}")
                groups.append({c: str(v[c]) for c in rules["columns"]})
            if isinstance(v, dict):
                v = _row_text(v, predictor, f"inputs[{i}]")
            text = predictor.check_text(v, f"inputs[{i}]")
        except DataError as e:
            raise HTTPError(422, str(e)) from None
        chars = sum(map(len, text)) if isinstance(text, tuple) else len(text)
        if chars > limits.max_text_chars:
            if limits.long_text == "reject":
                raise HTTPError(413, f"inputs[{i}]: {chars} characters; the limit is {limits.max_text_chars}")
            if isinstance(text, tuple):  # a pair: each text cut to its share of the limit
                text = tuple(t[: limits.max_text_chars * len(t) // chars] for t in text)
            else:
                text = text[: limits.max_text_chars]
            truncated = [*truncated, i]
        texts.append(text)
    return texts, truncated, groups


def _prepare_files(values: list[Any], predictor: Any) -> list[Any]:
    out = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            try:
                v = base64.b64decode(v.split(",", 1)[1] if v.startswith("data:") else v, validate=True)
            except (binascii.Error, ValueError):
                raise HTTPError(422, f"inputs[{i}]: not valid base64 (send {predictor.kind} files base64-encoded, "
                                     "or as multipart files)") from None
        elif not isinstance(v, (bytes, bytearray)):
            raise HTTPError(422, f"inputs[{i}]: expected a base64 string, got {type(v).__name__}")
        try:
            out.append(predictor.decode(bytes(v), f"inputs[{i}]"))
        except DataError as e:
            raise HTTPError(422, str(e)) from None
    return out


def create_app(predictor: Any, limits: Limits | None = None, api_key: str | None = None) -> Any:
    """The FastAPI application serving ``predictor`` (a ``fmtune.predictor.Predictor``, or a
    ``fmtune.generation.Generator``: POST /generate instead of /predict)."""
    from contextlib import asynccontextmanager

    limits = limits or Limits()
    generates = getattr(predictor, "generates", False)
    batcher = MicroBatcher(generation_batches(predictor) if generates else predictor.predict_items, limits)
    meta = predictor.metadata()

    @asynccontextmanager
    async def lifespan(app: Any):
        yield
        await batcher.close()  # after uvicorn has let the requests in flight finish

    app = FastAPI(title=f"fmtune: {meta['run']}", version=meta["model_version"], lifespan=lifespan,
                  description=f"{meta['task']} with {meta['model']} ({meta['strategy']}); labels: "
                              f"{', '.join(meta['labels']) or '-'}")
    app.state.batcher = batcher

    def error(request: Request, status: int, message: str, param: str | None = None) -> JSONResponse:
        if request.url.path.startswith(serve_anthropic.PATH):  # Anthropic's Messages API: errors in its shape
            status, body = serve_anthropic.error_response(status, message)
            return JSONResponse(body, status_code=status)
        if request.url.path.startswith("/v1/"):  # the OpenAI-compatible routes answer errors in OpenAI's shape
            return JSONResponse(serve_openai.error_body(status, message, param), status_code=status)
        return JSONResponse({"error": message}, status_code=status)

    def guard(request: Request) -> None:
        """The API key and the declared body size, checked before the body is read."""
        if api_key is not None:
            given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                raise HTTPError(401, "missing or wrong API key (send it as X-API-Key or Authorization: Bearer)")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_mb * 2**20:
            raise HTTPError(413, f"request body of {int(size)} bytes; the limit is {limits.max_body_mb:g} MB")

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, e: HTTPError) -> JSONResponse:
        return error(request, e.status, e.message, e.param)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        # never a traceback to the client; the service keeps serving
        return error(request, 500, f"internal error: {e.__class__.__name__}")

    async def read_body(request: Request) -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_mb * 2**20:
                raise HTTPError(413, f"request body over the limit of {limits.max_body_mb:g} MB")
        return bytes(body)

    async def read_json(request: Request) -> Any:
        body = await read_body(request)
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"the body is not valid JSON: {e}") from None

    async def prepared(values: list[Any]) -> list[Any]:
        """Inputs as the predictor takes them: texts checked (and cut to the limit), files decoded off the loop."""
        if predictor.kind == "text":
            return _prepare_texts(values, predictor, limits)[0]
        return await run_in_threadpool(_prepare_files, values, predictor)

    async def inputs_of(request: Request) -> tuple[list[Any], list[int], list[dict]]:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            if predictor.kind == "text":
                raise HTTPError(422, "file upload is for image and audio models; send texts as JSON "
                                     "{\"inputs\": [...]}")
            form = await request.form(max_files=limits.max_items + 1)
            files = [f for f in form.getlist("files") if hasattr(f, "read")]
            files = check_items(files, limits)
            raw = [await f.read() for f in files]
            return await run_in_threadpool(_prepare_files, raw, predictor), [], []
        data = await read_json(request)
        if not isinstance(data, dict) or "inputs" not in data:
            raise HTTPError(422, 'expected a JSON object {"inputs": [...]}')
        values = check_items(data["inputs"], limits)
        if predictor.kind == "text":
            return _prepare_texts(values, predictor, limits)
        return await run_in_threadpool(_prepare_files, values, predictor), [], []

    example = ([["A man plays a guitar.", "Someone makes music."]] if getattr(predictor, "pair_column", None) else
               ["a gripping, well-acted film"] if predictor.kind == "text" else [f"<base64 {predictor.kind} file>"])
    body_doc = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
            "inputs": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"oneOf": [
                {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2,
                                     "description": "a run on pairs of texts (data.text_pair_column): the two"},
                {"type": "object", "description": "a table row: its text key (a run on pairs: both texts' keys), "
                                     "or the columns of a tabular run (data.text_columns), plus any group columns "
                                     "the run's decision thresholds read"}]}}],
                       "example": example}}}},
        **({"multipart/form-data": {"schema": {"type": "object", "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}
           if predictor.kind in ("image", "audio") else {})}}}

    if generates:  # a generation run: POST /generate instead of /predict
        _generate_routes(app, predictor, limits, guard, read_json, batcher)
        serve_v2.add_generate_routes(app, predictor, meta, limits, guard, read_json, batcher)  # (Triton's)
        return _common_routes(app, meta, limits, batcher, guard)

    # OpenAI's API under /v1 where the run does what one of its endpoints does (fmtune.serve_openai)
    if predictor.kind == "text" and predictor.task.supports("embed") and not getattr(predictor, "pair_column", None):
        serve_openai.add_embedding_routes(app, predictor, limits, guard, read_json)
    elif predictor.task.supports("transcribe"):
        serve_openai.add_transcription_routes(app, predictor, batcher, limits, guard)

    @app.post("/predict", openapi_extra=body_doc)
    async def predict(request: Request) -> Any:
        """Predict one or many inputs; returns one prediction per input, in order."""
        guard(request)
        items, truncated, groups = await inputs_of(request)
        predictions = await batcher.submit(items)
        out: dict[str, Any] = {"predictions": predictions, "model_version": meta["model_version"]}
        if groups:  # per-group decision thresholds (fmtune fairness --fit-thresholds)
            import pandas as pd

            from fmtune.fairness import no_rule_warning, threshold_records

            unseen = threshold_records(predictor.thresholds, predictions, pd.DataFrame(groups), items)
            if unseen:
                out["warnings"] = [no_rule_warning(unseen)]
        if truncated:
            out["truncated"] = truncated
        return out

    async def scored(request: Request) -> dict[str, Any]:
        """{"predictions": [...]} of the inputs in one of the bodies MLflow's and SageMaker's scoring servers and
        KServe / TF Serving take (``scoring_inputs``)."""
        guard(request)
        if request.headers.get("content-type", "").startswith("text/csv"):
            values = _csv_rows(await read_body(request))
        else:
            values = scoring_inputs(await read_json(request))
        values = check_items(values, limits)
        if not (getattr(predictor, "pair_column", None) or tabular.uses_columns(predictor.config.data)):
            values = [next(iter(v.values())) if isinstance(v, dict) and len(v) == 1 else v for v in values]  # (a
            # frame of one column, whatever its name: pandas' Series of texts or files)
        return {"predictions": await batcher.submit(await prepared(values))}

    @app.post("/invocations", openapi_extra=SCORING_DOC)
    async def invocations(request: Request) -> Any:
        """MLflow's and SageMaker's scoring protocol: {"dataframe_split": {"columns", "data"}},
        {"dataframe_records": [...]}, {"instances": [...]} or {"inputs": ...} (or a CSV body); returns
        {"predictions": [...]}."""
        return await scored(request)

    @app.post("/v1/models/{name}:predict", openapi_extra=SCORING_DOC)
    async def kserve_predict(name: str, request: Request) -> Any:
        """KServe's and TF Serving's v1 protocol: {"instances": [...]} (or {"inputs": ...}); returns
        {"predictions": [...]}. Any model name: the one model served answers."""
        return await scored(request)

    serve_v2.add_routes(app, predictor, meta, limits, guard, read_body, batcher, prepared)  # (KServe v2, Triton)

    @app.get("/ping")
    async def ping() -> dict[str, str]:  # (SageMaker's and MLflow's health check)
        return {"status": "ok"}

    @app.get("/version")
    async def version() -> Any:  # (MLflow's scoring server: the model's version as text)
        from fastapi.responses import PlainTextResponse

        return PlainTextResponse(meta["model_version"])

    if type(predictor.task).hf_output is not Task.hf_output:
        @app.post("/", openapi_extra=HF_DOC)
        async def hf_inference(request: Request) -> Any:
            """The Hugging Face Inference API's format, for huggingface_hub's InferenceClient(model=URL): JSON
            {"inputs": one input or a list, "parameters": {...}}, or an image / audio file as the body."""
            guard(request)
            task, params = predictor.task, {}
            if getattr(predictor, "thresholds", None) is not None:
                raise HTTPError(422, "this run decides with per-group thresholds (fmtune fairness --fit-thresholds), "
                                     "which this format cannot carry: use POST /predict")
            if predictor.kind == "text" or request.headers.get("content-type", "").startswith("application/json"):
                data = await read_json(request)
                if not isinstance(data, dict) or "inputs" not in data:
                    raise HTTPError(422, 'expected {"inputs": ..., "parameters": {...}} (the Hugging Face Inference '
                                         "API), or an image or audio file as the body")
                params = data.get("parameters") or {}
                if not isinstance(params, dict):
                    raise HTTPError(422, "'parameters' must be an object")
                extra = [k for k, v in params.items() if v is not None and k not in task.hf_parameters]
                if extra:
                    raise HTTPError(422, f"parameters.{extra[0]} is not supported by this run (it takes: "
                                         f"{', '.join(task.hf_parameters) or 'none'})")
                single, inputs = not isinstance(data["inputs"], list), data["inputs"]
                if isinstance(inputs, dict) and getattr(predictor, "pair_column", None):
                    inputs = [inputs]  # one pair, {"text": ..., "text_pair": ...} as transformers' pipeline takes it
                values = check_items(inputs, limits)
                items = await prepared(values)
            else:  # the file itself, as the client sends one without parameters
                single, items = True, await run_in_threadpool(_prepare_files, [await read_body(request)], predictor)
            records = await batcher.submit(items)
            try:
                outs = [task.hf_output(r, params) for r in records]
            except DataError as e:
                raise HTTPError(422, str(e)) from None
            if not single:
                return outs
            return [outs[0]] if predictor.kind == "text" and task.hf_list_of_one else outs[0]

    return _common_routes(app, meta, limits, batcher, guard)


def scoring_inputs(data: Any) -> list[Any]:
    """The inputs of a body in MLflow's scoring format (``mlflow models serve``, SageMaker): a pandas DataFrame as
    {"dataframe_split": {"columns": [...], "data": [[...], ...]}} or {"dataframe_records": [{...}, ...]}, each row a
    table row (its text column, or a tabular run's columns); {"instances": [...]} (KServe's and TF Serving's v1) or
    {"inputs": [...]}, a list of inputs as /predict takes them; {"inputs": {"column": [...], ...}}, columns of rows."""
    if not isinstance(data, dict):
        raise HTTPError(422, 'expected a JSON object: {"dataframe_split": ...}, {"dataframe_records": [...]}, '
                             '{"instances": [...]} or {"inputs": [...]}')
    if "dataframe_split" in data:
        split = data["dataframe_split"]
        if not isinstance(split, dict) or not isinstance(split.get("data"), list):
            raise HTTPError(422, 'dataframe_split must be {"columns": [...], "data": [[...], ...]}')
        rows = split["data"]
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, list)), None)
        if bad is not None:
            raise HTTPError(422, f"dataframe_split.data[{bad}] must be a list of the row's values")
        columns = split.get("columns") or list(range(len(rows[0]) if rows else 0))
        if not isinstance(columns, list):
            raise HTTPError(422, "dataframe_split.columns must be a list of the columns' names")
        bad = next((i for i, r in enumerate(rows) if len(r) != len(columns)), None)
        if bad is not None:
            raise HTTPError(422, f"dataframe_split.data[{bad}] does not hold one value for each of the "
                                 f"{len(columns)} columns")
        return [dict(zip(map(str, columns), r)) for r in rows]
    if "dataframe_records" in data:
        if not isinstance(data["dataframe_records"], list):
            raise HTTPError(422, "dataframe_records must be a list of objects, one a row")
        return data["dataframe_records"]
    key = "instances" if "instances" in data else "inputs" if "inputs" in data else None
    if key is None:
        raise HTTPError(422, f"no inputs in the body (keys: {', '.join(map(str, data)) or 'none'}); send "
                             '{"dataframe_split": ...}, {"dataframe_records": [...]}, {"instances": [...]} or '
                             '{"inputs": [...]}')
    value = data[key]
    if isinstance(value, dict):  # columns of rows: {"text": [...]}
        lengths = {len(v) if isinstance(v, list) else -1 for v in value.values()}
        if len(lengths) != 1 or -1 in lengths:
            raise HTTPError(422, f"{key}: an object of columns must hold lists of one length")
        return [dict(zip(value, r)) for r in zip(*value.values())]
    return value


def _csv_rows(body: bytes) -> list[dict[str, Any]]:
    """A CSV body (MLflow's text/csv, a header and rows) as table rows."""
    import io

    import pandas as pd

    try:
        df = pd.read_csv(io.BytesIO(body), dtype=str, keep_default_na=False)
    except Exception as e:  # (pandas raises many types)
        raise HTTPError(400, f"the body is not CSV: {e}") from None
    return df.to_dict("records")


SCORING_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "properties": {
        "dataframe_split": {"type": "object", "properties": {"columns": {"type": "array"}, "data": {"type": "array"}}},
        "dataframe_records": {"type": "array", "items": {"type": "object"}},
        "instances": {"type": "array"}, "inputs": {}}},
        "example": {"dataframe_split": {"columns": ["text"], "data": [["a gripping, well-acted film"]]}}},
    "text/csv": {"schema": {"type": "string"}}}}}


HF_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "inputs": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                   "description": "texts; for image and audio runs base64 files"},
        "parameters": {"type": "object", "description": "top_k, function_to_apply (classification); "
                                                        "aggregation_strategy (ner); threshold (detection); "
                                                        "subtask (segmentation)"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def _common_routes(app: Any, meta: dict[str, Any], limits: Limits, batcher: Any, guard: Any) -> Any:
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model_version": meta["model_version"]}

    @app.get("/metadata")
    async def metadata(request: Request) -> dict[str, Any]:
        guard(request)
        return {**meta, "limits": asdict(limits), "stats": dict(batcher.stats)}

    return app


TGI_DOC = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["inputs"], "properties": {
        "inputs": {"type": "string"}, "parameters": {"type": "object", "description": "max_new_tokens, do_sample, "
                                                     "temperature, top_p, seed, stop, return_full_text"}}}}}}}
GENERATE_DOC = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "properties": {
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                   "description": "a prompt, or a list of them (answered together); the run's instruction and chat "
                                  "template are applied as in training"},
        "messages": {"type": "array", "items": {"type": "object"}, "description": "a chat: [{role, content}, ...] "
                     "(instead of prompt)"},
        "max_new_tokens": {"type": "integer"}, "temperature": {"type": "number", "description": "0: greedy"},
        "top_p": {"type": "number"}, "seed": {"type": "integer"},
        "stream": {"type": "boolean", "description": "server-sent events: data: {\"token\": ...} per piece of "
                   "text, then data: {\"done\": true, \"answer\": ...}"}},
    "description": "A prompt longer than the model reads (its max_length in tokens) is cut as `fmtune generate` cuts "
                   "it (a causal LM's start, an encoder-decoder's end) and the answer lists its position in "
                   "\"truncated\" (the stream's last event: \"truncated\": [0]); under --long-text reject it gets a "
                   "413 instead.",
    "example": {"prompt": "def add(a, b):\n    return a + b", "max_new_tokens": 32}}}}}}


def _generation_request(data: Any, limits: Limits) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows to answer and the decoding options of a POST /generate body, checked (HTTPError)."""
    from fmtune.tasks.generation import check_row

    if not isinstance(data, dict) or ("prompt" in data) == ("messages" in data):
        raise HTTPError(422, 'expected a JSON object with "prompt" (a string or a list) or "messages" (a chat)')
    if "prompt" in data:
        prompts = check_items(data["prompt"], limits)
        records = [{"prompt": p} for p in prompts]
    else:
        records = [{"messages": data["messages"]}]
    rows = []
    for i, rec in enumerate(records):
        try:
            if "prompt" in rec and not (isinstance(rec["prompt"], str) and rec["prompt"].strip()):
                raise DataError("the prompt must be a non-empty string")
            row = check_row(rec, f"{'prompt' if 'prompt' in rec else 'messages'}[{i}]", None, None, with_targets=False)
        except DataError as e:
            raise HTTPError(422, str(e)) from None
        text = row["prompt"] or row["messages"] or ""
        if len(text) > limits.max_text_chars:
            raise HTTPError(413, f"input {i}: {len(text)} characters; the limit is {limits.max_text_chars}")
        rows.append(row)
    opts: dict[str, Any] = {}
    for key, kind, low, high in (("max_new_tokens", int, 1, limits.max_new_tokens), ("temperature", float, 0.0, 5.0),
                                 ("top_p", float, 0.0, 1.0), ("seed", int, 0, 2**31 - 1)):
        value = number(data, key, kind, low, high)
        if value is not None:
            opts[key] = value
    if "stream" in data and not isinstance(data["stream"], bool):
        raise HTTPError(422, f"'stream' must be true or false, got {data['stream']!r}")
    if data.get("stream") and len(rows) > 1:
        raise HTTPError(422, "stream answers one prompt at a time; send one prompt, or stream: false")
    return rows, opts


def generation_batches(generator: Any) -> Any:
    """The MicroBatcher's ``run`` for a generation run (one decoding at a time: each uses every core): items
    are (row, decoding options) or, streamed, (row, options, sink: ``serve_base.open_stream``); rows asking for the same
    max_new_tokens are answered in one batched decoding (``Generator.complete``), each greedy or sampled with its
    own temperature, top_p and seed (its seed gives its answer, whatever else is asked at the time). Returns
    Completions."""
    def run(items: list[tuple[Any, ...]]) -> list[Any]:
        groups: dict[Any, list[int]] = {}
        for i, (_, opts, *_sink) in enumerate(items):
            groups.setdefault(opts.get("max_new_tokens"), []).append(i)
        out: list[Any] = [None] * len(items)
        for max_new_tokens, idx in groups.items():
            sinks = [items[i][2] if len(items[i]) > 2 else None for i in idx]
            done = generator.complete([items[i][0] for i in idx], max_new_tokens, options=[items[i][1] for i in idx],
                                      sinks=sinks if any(sinks) else None)
            for i, c in zip(idx, done):
                out[i] = c
        return out

    return run


# text-generation parameters of the Inference API / TGI that this service does not honour: refused unless
# neutral (what huggingface_hub's InferenceClient.text_generation sends by default)
TGI_NEUTRAL = {"details": (False,), "decoder_input_details": (False,), "best_of": (1,), "watermark": (False,),
               "top_n_tokens": (0,), "adapter_id": (), "grammar": (), "repetition_penalty": (1, 1.0),
               "frequency_penalty": (0, 0.0), "typical_p": (1, 1.0), "top_k": (), "truncate": ()}


def _tgi_request(data: Any, limits: Limits) -> tuple[dict[str, Any], dict[str, Any], list[str], bool]:
    """A text-generation request in the Inference API's format ({"inputs": prompt, "parameters": {...}}) as
    (row, decoding options, stop strings, return_full_text), checked (HTTPError)."""
    if not isinstance(data, dict) or not isinstance(data.get("inputs"), str):
        raise HTTPError(422, 'expected {"inputs": "a prompt", "parameters": {...}} (the Hugging Face Inference API)')
    if data.get("stream") is not None and not isinstance(data["stream"], bool):
        raise HTTPError(422, f"'stream' must be true or false, got {data['stream']!r}")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise HTTPError(422, "'parameters' must be an object")
    for key, neutral in TGI_NEUTRAL.items():
        if params.get(key) is not None and params[key] not in neutral:
            raise HTTPError(422, f"parameters.{key}: {params[key]!r} is not supported by this service; leave it out")
    sampled = params.get("do_sample") or (params.get("do_sample") is None and params.get("temperature"))
    temperature = (params.get("temperature") or 1.0) if sampled else None
    body = {"prompt": data["inputs"], "temperature": temperature,
            **{k: params.get(k) for k in ("max_new_tokens", "top_p", "seed")}}
    rows, opts = _generation_request(body, limits)
    stops = params.get("stop") or []
    if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
        raise HTTPError(422, "parameters.stop must be a list of non-empty strings")
    return rows[0], opts, stops, bool(params.get("return_full_text"))


def _tgi_token(i: int, text: str, whole: str | None) -> dict[str, Any]:
    """One streamed event of TGI's: a piece of text (its ``id`` is its position, not a token id), and
    on the last the whole text."""
    return {"token": {"id": i, "text": text, "logprob": 0.0, "special": whole is not None},
            "generated_text": whole, "details": None}


def _generate_routes(app: Any, generator: Any, limits: Limits, guard: Any, read_json: Any, batcher: Any) -> None:
    serve_openai.add_routes(app, generator, limits, guard, read_json, batcher)
    serve_anthropic.add_routes(app, generator, limits, guard, read_json, batcher)
    serve_ollama.add_routes(app, generator, limits, guard, read_json, batcher)

    @app.post("/", openapi_extra=TGI_DOC)
    async def text_generation(request: Request) -> Any:
        """The Hugging Face Inference API's text generation (huggingface_hub's InferenceClient(model=URL)
        .text_generation): [{"generated_text": ...}], greedy unless do_sample or a temperature."""
        guard(request)
        data = await read_json(request)
        row, opts, stops, full = _tgi_request(data, limits)
        serve_openai.read_prompts(generator, [row], limits, "inputs")  # (413 if too long under --long-text reject)
        if data.get("stream"):  # TGI's events: data: {"token": {"text": ...}, "generated_text": null}, the last
            read = open_stream(batcher, row, opts)

            def events(cancel: Any) -> Any:  # with the whole text
                scanner = serve_openai.StopScanner(stops)
                for i, text in enumerate(scanner.relay(read(cancel))):
                    yield f"data: {json.dumps(_tgi_token(i, text, None))}\n\n"
                whole = (row["prompt"] if full else "") + scanner.answer
                yield f"data: {json.dumps(_tgi_token(-1, '', whole))}\n\n"

            return threaded_stream(events)
        (c,) = await batcher.submit([(row, opts)])
        text = serve_openai.cut_at_stop(c.text, stops)[0]
        return [{"generated_text": (row["prompt"] + text) if full else text}]

    @app.post("/generate", openapi_extra=GENERATE_DOC)
    async def generate(request: Request) -> Any:
        """Answer a prompt (or a list of them, or a chat); with "stream": true, the answer as
        server-sent events while it is decoded."""
        guard(request)
        data = await read_json(request)
        rows, opts = _generation_request(data, limits)
        _, cut = serve_openai.read_prompts(generator, rows, limits, "prompt" if "prompt" in data else "messages")
        said = {"truncated": cut} if cut else {}  # (as /predict lists its cut texts)
        version = generator.version
        if data.get("stream"):
            read = open_stream(batcher, rows[0], opts)

            def events(cancel: Any) -> Any:
                pieces = []
                for piece in read(cancel):
                    pieces.append(piece)
                    yield f"data: {json.dumps({'token': piece})}\n\n"
                end = {"done": True, "answer": "".join(pieces).strip(), "model_version": version, **said}
                yield f"data: {json.dumps(end)}\n\n"

            return threaded_stream(events)

        answers = [c.text for c in await batcher.submit(request_items(rows, opts))]
        single = isinstance(data.get("prompt"), str) or "messages" in data
        if single:
            return {"answer": answers[0], "model_version": version, **said}
        return {"answers": answers, "model_version": version, **said}


def serve(run: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: Limits | None = None, batch_size: int | None = None, backend: str = "torch",
          quiet: bool = False, precision: str | None = None) -> None:
    """Load ``run`` and serve it until stopped (Ctrl-C / SIGTERM: requests in flight finish first). ``precision``: what
    a classifier's or tagger's torch model predicts in (``Predictor``; default: the run's train.precision)."""
    import uvicorn

    from fmtune import ui
    from fmtune.predictor import Predictor
    from fmtune.run import read_task
    from fmtune.training.hardware import precision_name

    task = read_task(run)
    if task.level == "lm" and task.modality != "audio":  # text generation: POST /generate (generation.Generator)
        from fmtune.generation import Generator

        if backend == "onnx-int8":
            raise ConfigError("--backend onnx-int8: a generation run is served by torch or onnx")
        if precision is not None:
            raise ConfigError("--precision is for classifiers, taggers and the other predicting runs; a generation "
                              "run decodes as fmtune generate does")
        predictor = Generator(run, backend=backend)
    else:
        predictor = Predictor(run, batch_size, backend, precision)
    app = create_app(predictor, limits, api_key)
    if not quiet:
        how = f"{backend}, {precision_name(predictor.autocast)}" if isinstance(predictor, Predictor) else backend
        ui.console.print(f"[bold]fmtune serve[/] {run} ({how}, model {predictor.version}) on http://{host}:{port}  "
                         f"docs: http://{host}:{port}/docs" + ("  (API key required)" if api_key else ""))
        paths = [getattr(r, "path", "") for r in app.routes]
        openai = sorted(p.removeprefix("/v1/") for p in paths if p.startswith("/v1/") and "{" not in p
                        and not p.startswith(serve_anthropic.PATH))
        if openai:
            ui.console.print(f"OpenAI-compatible ({', '.join(openai)}): base_url http://{host}:{port}/v1, model "
                             f"{predictor.run_dir.name!r}")
        if serve_anthropic.PATH in paths:
            ui.console.print(f"Anthropic-compatible (messages): base_url http://{host}:{port}")
    uvicorn.run(app, host=host, port=port, log_level="warning" if quiet else "info", timeout_graceful_shutdown=30)
