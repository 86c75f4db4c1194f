"""The HTTP service: predictions equal fmtune.load's, concurrent requests share forward passes,
bad input is a 4xx JSON error and the service keeps serving, the API key is enforced, and a
real server finishes the request in flight when stopped."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import cfg_dict
from fastapi.testclient import TestClient

import fmtune
from fmtune.serve import Limits, create_app


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, image_dirs):
    out = tmp_path_factory.mktemp("serve-img") / "run"
    fmtune.train(cfg_dict("mobilenet-v2", image_dirs["train"], out=str(out), model={"image_size": 32},
                          train={"epochs": 1}), quiet=True)
    return out


def test_predict_health_metadata_docs(text_run):
    pred = fmtune.load(text_run)
    with TestClient(create_app(pred)) as client:
        texts = ["good movie really", "the plot was awful"]
        r = client.post("/predict", json={"inputs": texts})
        assert r.status_code == 200, r.text
        body = r.json()
        want = pred.predict(texts)
        assert [p["label"] for p in body["predictions"]] == [w["label"] for w in want]
        assert [p["score"] for p in body["predictions"]] == pytest.approx([w["score"] for w in want], abs=1e-5)
        assert body["model_version"] == pred.version
        one = client.post("/predict", json={"inputs": "good movie"}).json()["predictions"]
        assert len(one) == 1
        assert client.get("/health").json() == {"status": "ok", "model_version": pred.version}
        meta = client.get("/metadata").json()
        assert meta["labels"] == ["neg", "pos"] and meta["strategy"] == "full" and "accuracy" in meta["test_metrics"]
        assert meta["thresholds"] is None  # (single-label: the most probable label, no threshold)
        assert client.get("/docs").status_code == 200
        assert "/predict" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("request_kw,status,message", [
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ({"json": {"texts": ["a"]}}, 422, 'expected a JSON object {"inputs"'),
    ({"json": {"inputs": []}}, 422, "empty list"),
    ({"json": {"inputs": [1, 2]}}, 422, "inputs[0]: expected text, got int"),
    ({"json": {"inputs": {"a": 1}}}, 422, "must be a string or a list"),
    ({"json": {"inputs": ["ok", "   "]}}, 422, "inputs[1]: the text is empty"),
    ({"json": {"inputs": ["x"] * 11}}, 413, "11 inputs in one request; the limit is 10"),
    ({"json": {"inputs": ["x" * 2000]}}, 413, "the limit is 1000 MB"),
    ({"files": {"files": ("a.png", b"abc", "image/png")}}, 422, "file upload is for image and audio models"),
])
def test_bad_input_is_a_4xx_json_error_and_the_service_goes_on(text_run, request_kw, status, message):
    limits = Limits(max_items=10, max_body_mb=1000, max_text_chars=100, long_text="reject")
    if "x" * 2000 in str(request_kw):
        limits = Limits(max_body_mb=0.001)
    with TestClient(create_app(fmtune.load(text_run), limits)) as client:
        r = client.post("/predict", **request_kw)
        assert r.status_code == status, r.text
        assert message.replace("1000 MB", f"{limits.max_body_mb:g} MB") in r.json()["error"]
        assert client.post("/predict", json={"inputs": ["fine"]}).status_code == 200


def test_long_texts_are_truncated_or_rejected(text_run):
    pred = fmtune.load(text_run)
    with TestClient(create_app(pred, Limits(max_text_chars=20))) as client:
        r = client.post("/predict", json={"inputs": ["fine", "good " * 50]})
        assert r.status_code == 200 and r.json()["truncated"] == [1]
    with TestClient(create_app(pred, Limits(max_text_chars=20, long_text="reject"))) as client:
        r = client.post("/predict", json={"inputs": ["fine", "good " * 50]})
        assert r.status_code == 413 and "inputs[1]: 250 characters; the limit is 20" in r.json()["error"]


def test_service_limits_that_would_refuse_everything_are_an_error_naming_the_flag(text_run, capsys):
    from fmtune.cli import main

    assert main(["serve", str(text_run), "--max-batch", "0"]) != 0
    assert "--max-batch must be at least 1, got 0" in capsys.readouterr().err
    assert main(["serve", str(text_run), "--max-new-tokens", "0"]) != 0
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err


def test_the_official_openai_client_embeds_texts_with_the_fine_tuned_encoder(text_run):
    """POST /v1/embeddings through the openai package (which asks for base64 unless told otherwise): the
    run's pooled features, normalised; model routes; errors as the client's own exceptions."""
    import numpy as np
    import openai

    pred = fmtune.load(text_run)
    texts = ["good film", "bad film", "fine"]
    feats, _ = pred.embed(texts)
    expected = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    with TestClient(create_app(pred, Limits(max_items=4), api_key="k")) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=http, max_retries=0)
        assert [m.id for m in client.models.list()] == [text_run.name]
        r = client.embeddings.create(model="any", input=texts)  # base64 on the wire
        got = np.array([d.embedding for d in r.data])
        assert got.shape == expected.shape and np.allclose(got, expected, atol=1e-5)
        assert [d.index for d in r.data] == [0, 1, 2] and r.model == text_run.name and r.usage.prompt_tokens > 3
        r = client.embeddings.create(model="any", input="good film", encoding_format="float")
        assert np.allclose(r.data[0].embedding, expected[0], atol=1e-5)
        for kw, error, match in [
            ({"input": ["a"] * 5}, openai.APIStatusError, "5 inputs in one request; the limit is 4"),
            ({"input": [[1, 2, 3]]}, openai.UnprocessableEntityError, "token-id inputs are not supported"),
            ({"input": [""]}, openai.UnprocessableEntityError, "non-empty strings"),
            ({"input": "x", "dimensions": 7}, openai.UnprocessableEntityError, "embeddings have \\d+"),
        ]:
            with pytest.raises(error, match=match) as e:
                client.embeddings.create(model="any", **kw)
            assert e.value.body["param"] in ("input", "dimensions")
        assert http.post("/v1/embeddings", json={"input": "x"}).status_code == 401
    pairs = fmtune.load(text_run)
    pairs.pair_column = "second"  # a run on pairs has no embedding of one text: no such route
    with TestClient(create_app(pairs)) as http:
        assert http.post("/v1/embeddings", json={"input": "x"}).status_code == 404


def test_huggingface_hub_inference_client_classifies_texts_and_images(text_run, image_run, image_dirs, monkeypatch):
    """POST / in the Hugging Face Inference API's format, through huggingface_hub's own InferenceClient
    pointed at the service: text and image classification, top_k, a list of texts, refused parameters; and
    feature extraction (the fine-tuned encoder's pooled features) from POST /pipeline/feature-extraction."""
    import numpy as np
    from conftest import hf_inference_client, live_server

    pred = fmtune.load(text_run)
    want = pred.predict(["good film", "awful plot"])
    with live_server(create_app(pred)) as url:
        client = hf_inference_client(url, monkeypatch)
        got = client.text_classification("good film")
        assert [(g.label, round(g.score, 6)) for g in got] == sorted(
            ((k, round(v, 6)) for k, v in want[0]["probabilities"].items()), key=lambda kv: -kv[1])
        assert [g.label for g in client.text_classification("awful plot", top_k=1)] == [want[1]["label"]]
        both = httpx.post(url, json={"inputs": ["good film", "awful plot"]}).json()
        assert [b[0]["label"] for b in both] == [w["label"] for w in want]
        for body, message in [({"inputs": "x", "parameters": {"function_to_apply": "sigmoid"}}, "softmax"),
                              ({"inputs": "x", "parameters": {"stride": 4}}, "parameters.stride is not supported"),
                              ({"inputs": "x", "parameters": {"top_k": 0}}, "top_k must be a whole number"),
                              ({"text": "x"}, '"inputs"')]:
            r = httpx.post(url, json=body)
            assert r.status_code == 422 and message in r.json()["error"], (body, r.text)
    feats, _ = pred.embed(["good film", "awful plot"])
    with live_server(create_app(pred)) as url:  # the feature extraction pipeline's route, as the Inference API's
        client = hf_inference_client(f"{url}/pipeline/feature-extraction", monkeypatch)
        got = client.feature_extraction("good film")
        assert got.shape == (1, feats.shape[1]) and np.allclose(got[0], feats[0] / np.linalg.norm(feats[0]), atol=1e-5)
        raw = client.feature_extraction(["good film", "awful plot"], normalize=False)
        assert np.allclose(raw, feats, atol=1e-4)
        r = httpx.post(f"{url}/pipeline/feature-extraction", json={"inputs": "good " * 300, "truncate": False})
        assert r.status_code == 413 and "tokens; the model reads" in r.json()["error"]
        r = httpx.post(f"{url}/pipeline/feature-extraction", json={"inputs": "x", "prompt_name": "query"})
        assert r.status_code == 422 and "prompt_name is not supported" in r.json()["error"]
        # Text Embeddings Inference's route, as its clients call it (LlamaIndex's TextEmbeddingsInference ...)
        r = httpx.post(f"{url}/embed", json={"inputs": ["good film", "awful plot"], "normalize": False,
                                            "truncate": True})
        assert r.status_code == 200 and np.allclose(r.json(), feats, atol=1e-4)
    image = next(image_dirs["train"].rglob("*.png"))
    images = fmtune.load(image_run)
    with live_server(create_app(images)) as url:
        got = hf_inference_client(url, monkeypatch).image_classification(image)  # the file's bytes as the body
        assert got[0].label == images.predict(str(image))["label"]
        assert httpx.post(url, content=b"junk").status_code == 422


def test_mlflow_sagemaker_and_kserve_clients_score_through_their_protocols(text_run, image_run, image_dirs):
    """POST /invocations as MLflow's scoring server and SageMaker take it, through MLflow's own ScoringServerClient
    (a pandas DataFrame as dataframe_split; a list as inputs); dataframe_records, a CSV body, columns of rows, and
    KServe's / TF Serving's v1 {"instances": [...]} at /v1/models/NAME:predict: the predictions are /predict's.
    Bodies it cannot read are 4xx errors that say what it takes."""
    import pandas as pd
    from conftest import live_server
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    pred = fmtune.load(text_run)
    texts = ["good film", "awful plot", "the plot was awful, the film good"]
    want = [p["label"] for p in pred.predict(texts)]
    with live_server(create_app(pred)) as url:
        host, port = url.removeprefix("http://").split(":")
        client = ScoringServerClient(host, int(port))
        client.wait_server_ready(timeout=30)
        assert client.get_version() == pred.version
        for data in (pd.DataFrame({"text": texts}), pd.DataFrame({0: texts}), texts):
            got = client.invoke(data)["predictions"]
            assert [g["label"] for g in got] == want, data
        for body in ({"dataframe_records": [{"text": t} for t in texts]}, {"inputs": {"text": texts}},
                     {"instances": texts}):
            r = httpx.post(f"{url}/invocations", json=body)
            assert [g["label"] for g in r.json()["predictions"]] == want, body
        kserve = httpx.post(f"{url}/v1/models/sentiment:predict", json={"instances": [{"text": t} for t in texts]})
        assert [g["label"] for g in kserve.json()["predictions"]] == want
        csv = httpx.post(f"{url}/invocations", content=pd.DataFrame({"text": texts}).to_csv(index=False).encode(),
                         headers={"content-type": "text/csv"})
        assert [g["label"] for g in csv.json()["predictions"]] == want
        for body, message in [({"rows": texts}, "no inputs in the body (keys: rows)"),
                              ({"dataframe_split": {"columns": ["text"], "data": [["a", "b"]]}},
                               "dataframe_split.data[0] does not hold one value for each of the 1 columns"),
                              ({"inputs": {"text": texts, "id": [1]}}, "lists of one length"),
                              ({"dataframe_split": {"columns": [], "data": [None]}}, "data[0] must be a list"),
                              ({"instances": []}, "empty list")]:
            r = httpx.post(f"{url}/invocations", json=body)
            assert r.status_code == 422 and message in r.json()["error"], (body, r.text)
    images = fmtune.load(image_run)
    f = sorted((image_dirs["test"] / "bottom").iterdir())[0]
    with TestClient(create_app(images)) as client:
        r = client.post("/invocations", json={"instances": [base64.b64encode(f.read_bytes()).decode()]})
        assert r.json()["predictions"][0]["label"] == images.predict(str(f))["label"]
        assert client.get("/ping").status_code == 200


def test_triton_and_kserve_v2_clients_infer_through_the_open_inference_protocol(text_run, image_run, image_dirs):
    """The Open Inference Protocol (KServe v2, Triton, MLServer) was not served: tritonclient got 404s. Now
    tritonclient.http (its default: inputs and outputs as binary tensors) and plain JSON requests get the
    predictions /predict gives, each key an output tensor (labels BYTES, scores FP32, probabilities FP32 [N, K] named
    by parameters.labels); health, server and model metadata answer; image runs take the files' bytes; bad requests
    are 4xx errors naming the input."""
    import numpy as np
    import tritonclient.http as triton
    from conftest import live_server

    pred = fmtune.load(text_run)
    texts = ["good film", "awful plot", "the plot was awful, the film good"]
    want = pred.predict(texts)
    with live_server(create_app(pred)) as url:
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("sentiment")
        assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
        assert client.get_model_metadata("sentiment")["inputs"] == [{"name": "text", "datatype": "BYTES",
                                                                      "shape": [-1]}]
        for shape, binary in (([3], True), ([3, 1], False)):
            tensor = triton.InferInput("text", shape, "BYTES")
            tensor.set_data_from_numpy(np.array(texts, dtype=object).reshape(shape), binary_data=binary)
            outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("label", "score", "probabilities")]
            result = client.infer("sentiment", [tensor], outputs=outputs)
            got = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]  # (JSON: str)
            assert got == [w["label"] for w in want]
            np.testing.assert_allclose(result.as_numpy("score"), [w["score"] for w in want], rtol=1e-6)
            labels = result.get_output("probabilities")["parameters"]["labels"].split(",")
            np.testing.assert_allclose(result.as_numpy("probabilities"),
                                       [[w["probabilities"][lab] for lab in labels] for w in want], rtol=1e-6)
        plain = httpx.post(f"{url}/v2/models/any/infer", json={"id": "7", "inputs": [
            {"name": "text", "shape": [2], "datatype": "BYTES", "data": texts[:2]}]}).json()
        assert plain["id"] == "7" and {o["name"] for o in plain["outputs"]} >= {"label", "score", "probabilities"}
        assert next(o for o in plain["outputs"] if o["name"] == "label")["data"] == [w["label"] for w in want[:2]]
        for body, message in [({"inputs": []}, "a non-empty list"),
                              ({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a"]}]},
                               "inputs[0] (text): 1 values for shape [2]"),
                              ({"inputs": [{"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}]},
                               "several values a row"),
                              ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                                "outputs": [{"name": "logits"}]}, "output 'logits' is not one of this model's")]:
            r = httpx.post(f"{url}/v2/models/m/infer", json=body)
            assert r.status_code in (400, 422) and message in r.json()["error"], (body, r.text)
    images = fmtune.load(image_run)
    files = sorted((image_dirs["test"] / "bottom").iterdir())[:2]
    with live_server(create_app(images)) as url:
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        tensor = triton.InferInput("image", [2], "BYTES")
        tensor.set_data_from_numpy(np.array([f.read_bytes() for f in files], dtype=object))
        result = client.infer("digits", [tensor])
        assert [v.decode() for v in result.as_numpy("label")] == [images.predict(str(f))["label"] for f in files]


def test_inference_api_answers_of_multilabel_and_regression_records():
    from fmtune.errors import DataError
    from fmtune.tasks import task_class

    multi = task_class("multilabel")(["a", "b", "c"])
    record = {"labels": ["b"], "probabilities": {"a": 0.2, "b": 0.9, "c": 0.4}}
    assert multi.hf_output(record, {}) == [{"label": "b", "score": 0.9}, {"label": "c", "score": 0.4},
                                           {"label": "a", "score": 0.2}]
    assert multi.hf_output(record, {"top_k": 1, "function_to_apply": "sigmoid"}) == [{"label": "b", "score": 0.9}]
    with pytest.raises(DataError, match="function_to_apply: 'softmax'; this model's scores are its sigmoid"):
        multi.hf_output(record, {"function_to_apply": "softmax"})
    assert task_class("regression")().hf_output({"value": 3.5}, {}) == [{"label": "value", "score": 3.5}]
    assert multi.hf_list_of_one and "top_k" in multi.hf_parameters


def test_api_key(text_run):
    with TestClient(create_app(fmtune.load(text_run), api_key="s3cret")) as client:
        assert client.post("/predict", json={"inputs": ["a"]}).status_code == 401
        assert client.post("/predict", json={"inputs": ["a"]}, headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.post("/predict", json={"inputs": ["a"]}, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.post("/predict", json={"inputs": ["a"]},
                           headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/metadata").status_code == 401
        assert client.get("/health").status_code == 200


def test_concurrent_requests_share_forward_passes(text_run):
    pred = fmtune.load(text_run)
    app = create_app(pred, Limits(max_wait_ms=200, max_batch=64))
    texts = [f"good movie {i}" if i % 2 else "awful plot really" for i in range(24)]

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            rs = await asyncio.gather(*[client.post("/predict", json={"inputs": [t]}) for t in texts])
            return [r.json()["predictions"][0] for r in rs]

    got = asyncio.run(main())
    want = pred.predict(texts)
    assert [g["label"] for g in got] == [w["label"] for w in want]  # each request got its own answer
    stats = app.state.batcher.stats
    assert stats["requests"] == 24 and stats["items"] == 24 and stats["batches"] < 24 / 2, stats


def test_images_as_base64_and_multipart(image_run, image_dirs):
    pred = fmtune.load(image_run)
    f = sorted((image_dirs["test"] / "bottom").iterdir())[0]
    with TestClient(create_app(pred)) as client:
        a = client.post("/predict", json={"inputs": [base64.b64encode(f.read_bytes()).decode()]})
        b = client.post("/predict", files=[("files", (f.name, f.read_bytes(), "image/png"))])
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        assert a.json()["predictions"] == b.json()["predictions"]
        assert a.json()["predictions"][0]["label"] == pred.predict(str(f))["label"]
        bad = client.post("/predict", json={"inputs": [base64.b64encode(b"not an image").decode()]})
        assert bad.status_code == 422 and "inputs[0]: not a readable image" in bad.json()["error"]
        assert client.post("/predict", json={"inputs": ["%%%"]}).status_code == 422
        assert client.post("/predict", files=[("files", ("x.png", b"junk", "image/png"))]).status_code == 422
        assert client.post("/predict", json={"inputs": [base64.b64encode(f.read_bytes()).decode()]}).status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_server_binds_loopback_and_finishes_in_flight_requests_on_sigterm(text_run):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fmtune", "serve", str(text_run), "--port", str(port),
                             "--max-wait-ms", "1500", "-q"], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("the server did not come up: " + proc.stderr.read()[-2000:] if proc.poll() else "")
        result = {}
        t = threading.Thread(target=lambda: result.update(r=httpx.post(url + "/predict", json={"inputs": ["good"]},
                                                                       timeout=30)))
        t.start()
        time.sleep(0.5)  # the request is waiting in the batcher (1.5 s window) when the stop comes
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert result["r"].status_code == 200 and result["r"].json()["predictions"][0]["label"] in ("neg", "pos")
        # uvicorn shuts down gracefully, then re-raises SIGTERM: the conventional exit status
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def fuzz(app, max_examples: int = 40) -> int:
    """schemathesis generates valid and invalid requests from the service's own OpenAPI schema; none
    may get a 5xx. Returns the number of requests made."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    cases = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        # GET endpoints take no input: there is nothing invalid to generate for them
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method.upper() == "POST" else [])
        for mode in modes:
            @settings(max_examples=max_examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                nonlocal cases
                response = case.call()
                cases += 1
                assert response.status_code < 500, (case.method, case.path, case.body, response.text)

            check()
    return cases


def test_schema_fuzz_finds_no_server_error(text_run):
    """Every route of a text run, /v1/embeddings included."""
    assert fuzz(create_app(fmtune.load(text_run), Limits(max_items=16))) >= 60  # GETs give one case each
