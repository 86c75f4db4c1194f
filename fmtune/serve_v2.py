"""The Open Inference Protocol (KServe's v2, the HTTP/REST API of NVIDIA Triton and Seldon MLServer) for a served
run that predicts (``fmtune.serve``), so their clients (``tritonclient.http``, KServe's ``InferenceRESTClient``) call
it as they call those servers:

    GET  /v2                          server metadata
    GET  /v2/health/live, /ready      200 while the service runs
    GET  /v2/models/NAME[/versions/V] model metadata: its inputs (BYTES, one a row)
    GET  /v2/models/NAME/ready        200
    POST /v2/models/NAME/generate[_stream]  a generation run: Triton's generate extension, {"text_input",
                                      "max_tokens", ...} -> {"text_output"} (streamed: server-sent events)
    POST /v2/models/NAME[/versions/V]/infer
         {"id", "inputs": [{"name", "shape": [N] or [N, 1], "datatype": "BYTES", "data": [...]}],
          "outputs": [{"name"}, ...]}
         -> {"model_name", "model_version", "id", "outputs": [{"name", "shape", "datatype", "data"}, ...]}

An input holds the rows' texts (or their image / audio files: raw bytes, or base64 as POST /predict takes them);
several inputs are the columns of a run on pairs of texts or on a table's columns. Each key of the predictions is an
output: strings BYTES, numbers FP32 (whole ones INT64), booleans BOOL, a dict of numbers a row (``probabilities``)
FP32 [N, K] whose ``parameters.labels`` names its columns, anything else (entities, boxes ...) BYTES of its JSON.
Triton's binary tensor extension is read and written (tritonclient sends inputs and asks for outputs as raw bytes
after the JSON header, whose length ``Inference-Header-Content-Length`` gives). Any model name answers: the one model
served.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from fmtune.serve_base import HTTPError, check_items

HEADER = "inference-header-content-length"  # Triton's binary tensor extension: the JSON part's length in bytes
NUMPY = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
         "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "BOOL": "?"}
INFER_DOC = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype"],
                                              "properties": {"name": {"type": "string"},
                                                             "shape": {"type": "array", "items": {"type": "integer"}},
                                                             "datatype": {"type": "string"},
                                                             "data": {"type": "array"},
                                                             "parameters": {"type": "object"}}}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"],
                                               "properties": {"name": {"type": "string"},
                                                              "parameters": {"type": "object"}}}},
        "parameters": {"type": "object"}},
    "example": {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a gripping film"]}]}}}}}}


def _common(app: Any, meta: dict[str, Any], guard: Any, inputs: list[dict[str, Any]],
            outputs: list[dict[str, Any]], extension: str) -> None:
    """The protocol's health and metadata routes (``inputs`` / ``outputs``: the model's, as its metadata lists
    them; ``extension``: the one this run's routes add, binary tensors or generate)."""
    from fmtune import __version__

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "fmtune", "version": __version__, "extensions": [extension]}

    @app.get("/v2/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, Any]:
        return {"ready": True}

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> dict[str, Any]:
        return {"name": name, "ready": True}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, request: Request, version: str | None = None) -> dict[str, Any]:
        guard(request)
        return {"name": name, "versions": [meta["model_version"]], "platform": "fmtune", "inputs": inputs,
                "outputs": outputs}


def add_routes(app: Any, predictor: Any, meta: dict[str, Any], limits: Any, guard: Any, read_body: Any,
               batcher: Any, prepared: Any) -> None:
    """The v2 routes of a predicting run on ``app`` (``fmtune.serve.create_app``'s helpers)."""
    _common(app, meta, guard, [{"name": c, "datatype": "BYTES", "shape": [-1]} for c in input_names(predictor)], [],
            "binary_tensor_data")

    @app.post("/v2/models/{name}/infer", openapi_extra=INFER_DOC)
    @app.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_DOC)
    async def infer(name: str, request: Request, version: str | None = None) -> Any:
        """The Open Inference Protocol's inference request (JSON, or JSON and binary tensors): its rows' predictions
        as output tensors."""
        guard(request)
        body = await read_body(request)
        data, tail = split_body(body, request.headers.get(HEADER))
        values = request_rows(data, tail, predictor.kind == "text")
        values = check_items(values, limits)
        predictions = await batcher.submit(await prepared(values))
        outputs, binary = requested(data, output_tensors(predictions))
        reply = {"model_name": name, "model_version": meta["model_version"], "outputs": outputs}
        if isinstance(data.get("id"), str):
            reply["id"] = data["id"]
        if binary:
            return binary_reply(reply)
        return JSONResponse(dict(reply, outputs=[{k: v for k, v in o.items() if k != "binary"} for o in outputs]))


# the generate extension's decoding parameters (top-level, as TensorRT-LLM's ensemble takes them, or under
# "parameters", as vLLM's backend): fmtune's name of each
GENERATE_PARAMETERS = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed",
                       "stop": "stop", "stop_words": "stop"}
GENERATE_DOC = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["text_input"], "properties": {
        "text_input": {"type": "string"}, "max_tokens": {"type": "integer"}, "temperature": {"type": "number"},
        "top_p": {"type": "number"}, "seed": {"type": "integer"},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "parameters": {"type": "object", "description": "the same decoding parameters, as vLLM's backend takes "
                                                        "them"}},
    "example": {"text_input": "Write a haiku about autumn.", "max_tokens": 32}}}}}}


def add_generate_routes(app: Any, generator: Any, meta: dict[str, Any], limits: Any, guard: Any, read_json: Any,
                        batcher: Any) -> None:
    """Triton's generate extension for a generation run: POST /v2/models/NAME/generate {"text_input", "max_tokens",
    "temperature", "top_p", "seed", "stop"} -> {"model_name", "model_version", "text_output"}; .../generate_stream
    the answer's pieces as server-sent events of the same object. Greedy unless a temperature is sent; what else is
    sent is refused (422) naming it, never ignored."""
    from fmtune import serve_openai
    from fmtune.serve_base import json_object, open_stream, threaded_stream

    _common(app, meta, guard, [{"name": "text_input", "datatype": "BYTES", "shape": [1]}],
            [{"name": "text_output", "datatype": "BYTES", "shape": [1]}], "generate")

    async def request_of(request: Request) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        data = await json_object(request, guard, read_json)
        prompt = data.get("text_input")
        if not isinstance(prompt, str) or not prompt.strip():
            raise HTTPError(422, "'text_input' must be a non-empty string: the prompt")
        nested = data.get("parameters") or {}
        if not isinstance(nested, dict):
            raise HTTPError(422, "'parameters' must be an object")
        given = {**{k: v for k, v in data.items() if k not in ("text_input", "parameters", "id", "stream")},
                 **nested}
        given = {k: v for k, v in given.items() if v is not None and v != ""}
        other = [k for k in given if k not in GENERATE_PARAMETERS]
        if other:
            raise HTTPError(422, f"{other[0]!r} is not supported by this service (it takes text_input, "
                                 f"{', '.join(GENERATE_PARAMETERS)})")
        named = {GENERATE_PARAMETERS[k]: v for k, v in given.items()}
        opts = serve_openai.decoding_options(named, limits, "max_tokens")
        stops = serve_openai.stop_strings(named)
        row = serve_openai.prompt_rows([{"prompt": prompt}], limits, "text_input")[0]
        serve_openai.read_prompts(generator, [row], limits, "text_input")  # (too long: cut, or 413 under reject)
        return row, opts, stops

    def reply(name: str, text: str) -> dict[str, Any]:
        return {"model_name": name, "model_version": meta["model_version"], "text_output": text}

    @app.post("/v2/models/{name}/generate", openapi_extra=GENERATE_DOC)
    async def generate(name: str, request: Request) -> Any:
        """Triton's generate extension: the answer to ``text_input``."""
        row, opts, stops = await request_of(request)
        (c,) = await batcher.submit([(row, opts)])
        return reply(name, serve_openai.cut_at_stop(c.text, stops)[0])

    @app.post("/v2/models/{name}/generate_stream", openapi_extra=GENERATE_DOC)
    async def generate_stream(name: str, request: Request) -> Any:
        """Triton's generate extension, streamed: server-sent events of the answer's pieces."""
        row, opts, stops = await request_of(request)
        read = open_stream(batcher, row, opts)

        def events(cancel: Any) -> Any:
            scanner = serve_openai.StopScanner(stops)
            for text in scanner.relay(read(cancel, {})):
                yield f"data: {json.dumps(reply(name, text))}\n\n"

        return threaded_stream(events)


def input_names(predictor: Any) -> list[str]:
    """The inputs a request gives: the text (or image / audio) column, a run on pairs its two text columns, a run on
    a table's columns those columns."""
    from fmtune.data import tabular

    cfg = predictor.config.data
    if getattr(predictor, "pair_column", None):
        return [cfg.text_column, predictor.pair_column]
    if tabular.uses_columns(cfg):
        named = tabular.template_columns(cfg.text_template) if cfg.text_template else tabular.split_names(
            cfg.text_columns)
        return named if named != ["all"] else [cfg.text_column]
    return [cfg.text_column if predictor.kind == "text" else predictor.kind]


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON of a request and the binary tensors after it (Triton's extension: the JSON's length in the
    Inference-Header-Content-Length header)."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise HTTPError(400, f"Inference-Header-Content-Length {header_length!r} is not the length of the "
                                 f"JSON part of a {len(body)}-byte body")
        head, tail = body[:int(header_length)], body[int(header_length):]
    else:
        head, tail = body, b""
    try:
        data = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise HTTPError(422, 'expected a JSON object {"inputs": [{"name", "shape", "datatype", "data"}, ...]}')
    return data, tail


def _flat(value: Any) -> list[Any]:
    return [x for v in value for x in _flat(v)] if isinstance(value, list) else [value]


def from_binary(raw: bytes, datatype: str, count: int, where: str) -> list[Any]:
    """``count`` values of ``datatype`` from Triton's binary form: BYTES each a 4-byte little-endian length and
    its bytes, numbers as little-endian arrays."""
    if datatype == "BYTES":
        out, i = [], 0
        while i < len(raw):
            if i + 4 > len(raw):
                raise HTTPError(422, f"{where}: its BYTES data ends inside an element's length")
            n = int.from_bytes(raw[i:i + 4], "little")
            out.append(raw[i + 4:i + 4 + n])
            i += 4 + n
        if i != len(raw):
            raise HTTPError(422, f"{where}: its BYTES data ends inside an element")
        return out
    if datatype not in NUMPY:
        raise HTTPError(422, f"{where}: datatype {datatype!r} is not one of the protocol's")
    dtype = np.dtype(NUMPY[datatype])
    if len(raw) != count * dtype.itemsize:
        raise HTTPError(422, f"{where}: {len(raw)} bytes of binary data for {count} {datatype} values")
    return np.frombuffer(raw, dtype).tolist()


def request_rows(data: dict[str, Any], tail: bytes, texts: bool) -> list[Any]:
    """The rows of an inference request: its one input's values (texts; files: bytes, or base64 strings), or, of
    several inputs, a dict a row of their names to their values. HTTPError (4xx) naming what is wrong."""
    inputs = data.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise HTTPError(422, 'expected "inputs": a non-empty list of {"name", "shape", "datatype", "data"}')
    offset, columns = 0, {}
    for k, t in enumerate(inputs):
        where = f"inputs[{k}]"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("datatype"), str):
            raise HTTPError(422, f'{where} must be an object with "name", "shape", "datatype" and "data"')
        shape = t.get("shape")
        if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise HTTPError(422, f"{where} ({t['name']}): shape must be a list of sizes, [rows] or [rows, 1]")
        if math.prod(shape[1:]) != 1:
            raise HTTPError(422, f"{where} ({t['name']}): shape {shape} holds several values a row; send one a row "
                                 "([rows] or [rows, 1])")
        size = _parameters(t).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(tail):
                raise HTTPError(422, f"{where} ({t['name']}): binary_data_size {size!r} is past the binary data sent")
            values = from_binary(tail[offset:offset + size], t["datatype"], shape[0], f"{where} ({t['name']})")
            offset += size
        elif "data" in t:
            values = _flat(t["data"])
        else:
            raise HTTPError(422, f"{where} ({t['name']}): no data (nor parameters.binary_data_size)")
        if len(values) != shape[0]:
            raise HTTPError(422, f"{where} ({t['name']}): {len(values)} values for shape {shape}")
        if texts or len(inputs) > 1:
            try:
                values = [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]
            except UnicodeDecodeError:
                raise HTTPError(422, f"{where} ({t['name']}): its BYTES are not UTF-8 text") from None
        columns[t["name"]] = values
    if len({len(v) for v in columns.values()}) > 1:
        raise HTTPError(422, f"the inputs hold different numbers of rows: "
                             f"{', '.join(f'{n} {len(v)}' for n, v in columns.items())}")
    if len(columns) == 1:
        return next(iter(columns.values()))
    return [dict(zip(columns, row)) for row in zip(*columns.values())]


def output_tensors(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each key of the rows' predictions as an output tensor (see the module's docstring)."""
    keys = list(dict.fromkeys(k for p in predictions for k in p))
    out = []
    for key in keys:
        values = [p.get(key) for p in predictions]
        n = len(values)
        if all(isinstance(v, bool) for v in values):
            out.append({"name": key, "datatype": "BOOL", "shape": [n], "data": values})
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            out.append({"name": key, "datatype": "INT64", "shape": [n], "data": values})
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out.append({"name": key, "datatype": "FP32", "shape": [n], "data": [float(v) for v in values]})
        elif all(isinstance(v, str) for v in values):
            out.append({"name": key, "datatype": "BYTES", "shape": [n], "data": values})
        elif (all(isinstance(v, dict) for v in values) and len({tuple(v) for v in values}) == 1
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) for v in values for x in v.values())):
            labels = list(values[0])
            out.append({"name": key, "datatype": "FP32", "shape": [n, len(labels)],
                        "data": [float(v[lab]) for v in values for lab in labels],
                        "parameters": {"labels": ",".join(map(str, labels))}})
        else:
            out.append({"name": key, "datatype": "BYTES", "shape": [n], "data": [json.dumps(v) for v in values]})
    return out


def _parameters(obj: dict[str, Any]) -> dict[str, Any]:
    """An object's ``parameters`` (the protocol's options of a request, an input or an output); {} where none."""
    value = obj.get("parameters")
    return value if isinstance(value, dict) else {}


def requested(data: dict[str, Any], outputs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """The outputs a request asks for (all where it names none), each marked for binary where it asks so (its
    ``parameters.binary_data``, or the request's ``binary_data_output``); and whether any is."""
    default = bool(_parameters(data).get("binary_data_output", False))
    asked = data.get("outputs")
    if asked is None:
        chosen = [(o, default) for o in outputs]
    else:
        if not isinstance(asked, list) or not all(isinstance(a, dict) and isinstance(a.get("name"), str)
                                                  for a in asked):
            raise HTTPError(422, '"outputs" must be a list of {"name": ...}')
        by_name = {o["name"]: o for o in outputs}
        unknown = [a["name"] for a in asked if a["name"] not in by_name]
        if unknown:
            raise HTTPError(400, f"output {unknown[0]!r} is not one of this model's: {', '.join(by_name)}")
        chosen = [(by_name[a["name"]], bool(_parameters(a).get("binary_data", default))) for a in asked]
    return [dict(o, binary=b) for o, b in chosen], any(b for _, b in chosen)


def _to_binary(o: dict[str, Any]) -> bytes:
    if o["datatype"] == "BYTES":
        return b"".join(len(b).to_bytes(4, "little") + b for b in (str(v).encode("utf-8") for v in o["data"]))
    return np.asarray(o["data"], dtype=NUMPY[o["datatype"]]).tobytes()


def binary_reply(reply: dict[str, Any]) -> Response:
    """A reply in Triton's binary tensor extension: the JSON (the binary outputs without their data, their sizes
    in ``parameters.binary_data_size``), then their bytes in order."""
    blobs, outputs = [], []
    for o in reply["outputs"]:
        binary = o.pop("binary")
        if binary:
            blob = _to_binary(o)
            blobs.append(blob)
            o = {k: v for k, v in o.items() if k != "data"}
            o["parameters"] = dict(o.get("parameters") or {}, binary_data_size=len(blob))
        outputs.append(o)
    head = json.dumps(dict(reply, outputs=outputs)).encode()
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})
