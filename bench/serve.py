"""Service benchmark: `fmtune serve` under load from a second process, on loopback.

    .venv/bin/python bench/serve.py [--run RUN] [--seconds 8] > result.json
    .venv/bin/python bench/serve.py --generation RUN [--clients 1,4,8] [--seconds 30] [--stream] > result.json

With --generation, RUN is a generation run (the generation demo's: `fmtune demo --task generation
--out RUN`) and the clients send OpenAI chat completions (POST /v1/chat/completions, greedy, at most
--max-tokens new tokens) of its test prompts: the service decoding concurrent requests together
(default settings) against one request at a time (--max-batch 1); answers/s, p50/p99 latency. With
--stream the requests are streamed (stream: true) and the time to the first piece of text is measured too;
one at a time (--max-batch 1) is how every stream was served before streams joined the batches. With
--temperature T the requests are sampled, each with a seed of its own (one at a time is how sampled requests
were served before they joined the batches).

The run is the text demo's (MiniLM-L6 fine-tuned on rotten-tomatoes; trained first with
`fmtune demo` when --run is not given). For each configuration, a server process is started on
a free loopback port and this process sends real rotten-tomatoes snippets, one per request,
from 1, 8 and 32 concurrent clients for a fixed time: requests/s, p50/p99 latency and errors.
Configurations: torch with micro-batching (default settings) and without (one request per
forward pass: --max-batch 1 --max-wait-ms 0), onnx and onnx-int8 with micro-batching.

Prints one JSON document on stdout; progress goes to stderr. The client and the server share
the machine's cores, as on a single host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GENERATION_CONFIGS = {"generation-batched": [], "generation-batched-wait-50ms": ["--max-wait-ms", "50"],
                      "generation-one-at-a-time": ["--max-batch", "1"]}
CONFIGS = {"torch-batched": ["--backend", "torch"],
           "torch-unbatched": ["--backend", "torch", "--max-batch", "1", "--max-wait-ms", "0"],  # one per forward
           "onnx-batched": ["--backend", "onnx"],
           "onnx-int8-batched": ["--backend", "onnx-int8"]}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def predict_body(text: str) -> dict:
    return {"inputs": [text]}


def predict_ok(body: dict) -> bool:
    return len(body["predictions"]) == 1


def chat_body(max_tokens: int, stream: bool = False, temperature: float = 0.0):
    seeds = iter(range(1 << 30))

    def body(prompt: str) -> dict:
        sampled = {"temperature": temperature, "seed": next(seeds)} if temperature else {}
        return {"model": "run", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                **({"stream": True} if stream else {}), **sampled}

    return body


async def streamed(http, url: str, body: dict) -> tuple[bool, float | None]:
    """One streamed chat completion: (whether it ended with [DONE] after some text, seconds to its first text)."""
    t, first, text, done = time.perf_counter(), None, "", False
    async with http.stream("POST", url, json=body) as r:
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                piece = (event["choices"][0]["delta"].get("content") or "") if event.get("choices") else ""
                if piece and first is None:
                    first = time.perf_counter() - t
                text += piece
    return r.status_code == 200 and done and bool(text), first


def chat_ok(body: dict) -> bool:
    return bool(body["choices"][0]["message"]["content"])


async def load(url: str, texts: list[str], clients: int, seconds: float, make=predict_body, ok_of=predict_ok,
               stream: bool = False) -> dict:
    import httpx

    latencies: list[float] = []
    firsts: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(k: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                if stream:
                    ok, first = await streamed(http, url, make(texts[i % len(texts)]))
                    if ok and first is not None:
                        firsts.append(first)
                else:
                    r = await http.post(url, json=make(texts[i % len(texts)]))
                    ok = r.status_code == 200 and ok_of(r.json())
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t)
            else:
                errors += 1
            i += clients

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*[client(k, http) for k in range(clients)])
    wall = time.perf_counter() - started
    def pick(values: list[float], q: float) -> float | None:
        values = sorted(values)
        return round(1000 * values[min(len(values) - 1, int(q * len(values)))], 1) if values else None

    out = {"clients": clients, "requests": len(latencies), "errors": errors,
           "requests_per_s": round(len(latencies) / wall, 2), "p50_ms": pick(latencies, 0.5),
           "p99_ms": pick(latencies, 0.99)}
    return out | ({"first_text_p50_ms": pick(firsts, 0.5), "first_text_p99_ms": pick(firsts, 0.99)} if stream else {})


def run_config(name: str, flags: list[str], run: Path, texts: list[str], args: argparse.Namespace) -> list[dict]:
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fmtune", "serve", str(run), "--port", str(port), "-q", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600  # the first onnx start exports the model
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name}: server exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        route, make, ok_of = (("/v1/chat/completions", chat_body(args.max_tokens, args.stream, args.temperature),
                               chat_ok)
                              if args.generation else ("/predict", predict_body, predict_ok))
        asyncio.run(load(base + route, texts, 4, 1.0, make, ok_of, args.stream))  # warm-up
        rows = []
        for clients in args.clients:
            res = {"config": name, **asyncio.run(load(base + route, texts, clients, args.seconds, make, ok_of,
                                                      args.stream))}
            log(json.dumps(res))
            rows.append(res)
        stats = httpx.get(base + "/metadata").json()["stats"]
        for r in rows:
            r["server_items_per_batch"] = round(stats["items"] / max(stats["batches"], 1), 1)
        return rows
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a trained text run (default: train the text demo into a temporary folder)")
    ap.add_argument("--seconds", type=float, default=8.0, help="load time per configuration and client count")
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--configs", default=None, help="comma-separated names of CONFIGS (GENERATION_CONFIGS)")
    ap.add_argument("--generation", metavar="RUN", help="a generation run: OpenAI chat completions of its test prompts")
    ap.add_argument("--max-tokens", type=int, default=32, help="--generation: new tokens per answer at most")
    ap.add_argument("--stream", action="store_true", help="--generation: streamed chat completions (stream: true)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="--generation: sampled requests at this temperature, each with a seed of its own")
    ap.add_argument("--no-in-process", action="store_true", help="--generation: skip the in-process comparison")
    args = ap.parse_args()
    if args.generation:
        generation(args)
        return

    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="fmtune-serve-bench-") as tmp:
        run = Path(args.run) if args.run else Path(tmp) / "demo"
        if not args.run:
            log("training the text demo run (about 2 minutes)")
            subprocess.run([sys.executable, "-m", "fmtune", "demo", "--out", str(run), "-q"], check=True,
                           stdout=subprocess.DEVNULL)
        cfg = (run / "config.yaml").read_text()
        test = next(ln.split(":", 1)[1].strip() for ln in cfg.splitlines() if ln.strip().startswith("test:"))
        texts = pd.read_csv(test)["text"].astype(str).tolist()
        rows = []
        for name in (args.configs or ",".join(CONFIGS)).split(","):
            log(f"{name}: starting the server")
            rows += run_config(name, CONFIGS[name], run, texts, args)
    import torch

    print(json.dumps({"benchmark": "serve", "date": time.strftime("%Y-%m-%d"), "run": "text demo (MiniLM-L6, "
                      "rotten-tomatoes)" if not args.run else str(args.run), "seconds_per_point": args.seconds,
                      "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                  "torch": torch.__version__},
                      "results": rows}, indent=2))


SHORT_FUNCTIONS = ["def add(a, b):\n    return a + b", "def is_even(n):\n    return n % 2 == 0",
                   "def first(xs):\n    return xs[0]", "def square(x):\n    return x * x",
                   "def last(xs):\n    return xs[-1]", "def neg(x):\n    return -x",
                   "def join(a):\n    return ','.join(a)", "def size(s):\n    return len(s)"]


def in_process(run: Path, prompts: list[str], max_tokens: int) -> dict:
    """Generator.complete on 8 prompts one at a time against as one batch (what the service does with
    8 concurrent requests), twice, in this process: seconds, and whether the answers are the same."""
    from fmtune.generation import Generator

    gen = Generator(run)
    out = {}
    for name, texts in (("run's test prompts", prompts[:8]), ("short functions", SHORT_FUNCTIONS)):
        rows = [{"kind": "prompt", "prompt": t, "completion": None, "messages": None} for t in texts]
        gen.complete(rows[:1], max_new_tokens=max_tokens)  # warm-up
        reps = []
        for _ in range(2):
            t = time.perf_counter()
            alone = [gen.complete([r], max_new_tokens=max_tokens)[0] for r in rows]
            a = time.perf_counter() - t
            t = time.perf_counter()
            together = gen.complete(rows, max_new_tokens=max_tokens)
            b = time.perf_counter() - t
            reps.append({"one_at_a_time_s": round(a, 2), "batch_of_8_s": round(b, 2), "speedup": round(a / b, 2),
                         "same_answers": [x.text for x in alone] == [x.text for x in together],
                         "prompt_tokens": sum(len(gen.prompt_ids(r)[0]) for r in rows),
                         "answer_tokens": sum(x.tokens for x in together)})
        out[name] = reps
        log(f"in process, {name}: {reps}")
    return out


def generation(args: argparse.Namespace) -> None:
    import torch

    run = Path(args.generation)
    prompts = [json.loads(line)["prompt"] for line in (run / "test_answers.jsonl").read_text().splitlines()]
    measured = None if args.no_in_process else in_process(run, prompts, args.max_tokens)
    rows = []
    for name in (args.configs or ",".join(GENERATION_CONFIGS)).split(","):
        log(f"{name}: starting the server")
        rows += run_config(name, GENERATION_CONFIGS[name], run, prompts, args)
    print(json.dumps({"benchmark": "serve --generation", "date": time.strftime("%Y-%m-%d"), "run": str(run),
                      "request": f"POST /v1/chat/completions, greedy, max_tokens {args.max_tokens}, one test prompt "
                                 "of the run per request (its instruction and chat template applied)"
                                 + (", streamed (stream: true)" if args.stream else "")
                                 + (f", sampled at temperature {args.temperature}, a seed per request"
                                    if args.temperature else ""),
                      "seconds_per_point": args.seconds,
                      "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                  "torch": torch.__version__},
                      "in_process_8_prompts": measured, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
