"""Service benchmark: `fmtune serve` under load from a second process, on loopback.

    .venv/bin/python bench/serve.py [--run RUN] [--seconds 8] > result.json

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


async def load(url: str, texts: list[str], clients: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(k: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                r = await http.post(url, json={"inputs": [texts[i % len(texts)]]})
                ok = r.status_code == 200 and len(r.json()["predictions"]) == 1
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t)
            else:
                errors += 1
            i += clients

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(*[client(k, http) for k in range(clients)])
    wall = time.perf_counter() - started
    latencies.sort()
    pick = (lambda q: round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)) \
        if latencies else (lambda q: None)
    return {"clients": clients, "requests": len(latencies), "errors": errors,
            "requests_per_s": round(len(latencies) / wall, 1), "p50_ms": pick(0.5), "p99_ms": pick(0.99)}


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
        asyncio.run(load(base + "/predict", texts, 4, 1.0))  # warm-up
        rows = []
        for clients in args.clients:
            res = {"config": name, **asyncio.run(load(base + "/predict", texts, clients, args.seconds))}
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
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of CONFIGS")
    args = ap.parse_args()

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
        for name in args.configs.split(","):
            log(f"{name}: starting the server")
            rows += run_config(name, CONFIGS[name], run, texts, args)
    import torch

    print(json.dumps({"benchmark": "serve", "date": time.strftime("%Y-%m-%d"), "run": "text demo (MiniLM-L6, "
                      "rotten-tomatoes)" if not args.run else str(args.run), "seconds_per_point": args.seconds,
                      "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                  "torch": torch.__version__},
                      "results": rows}, indent=2))


if __name__ == "__main__":
    main()
