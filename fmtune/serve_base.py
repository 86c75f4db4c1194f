"""What the HTTP service's routes share (``fmtune.serve`` and its OpenAI-compatible routes,
``fmtune.serve_openai``): the limits, the error a route raises for a 4xx, the checks of numbers and
input lists in a request body, server-sent events made in a worker thread, and streamed answers
decoded in the service's batches."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

from fmtune.errors import ConfigError


@dataclass
class Limits:
    max_batch: int = 64  # items per forward pass
    max_wait_ms: float = 0.0  # how long a batch that is not full waits for more requests
    max_items: int = 256  # items per request
    max_body_mb: float = 16.0
    max_text_chars: int = 20_000
    long_text: Literal["truncate", "reject"] = "truncate"
    max_new_tokens: int = 512  # generation runs: the most tokens one answer may ask for

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_items", "max_text_chars", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.max_body_mb <= 0:
            raise ConfigError(f"--max-wait-ms must be >= 0 and --max-body-mb > 0, got {self.max_wait_ms:g} and "
                              f"{self.max_body_mb:g}")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param  # param: the request field at fault


def number(data: dict[str, Any], key: str, kind: type, low: float, high: float) -> Any:
    """``data[key]`` checked to be a number of ``kind`` in [low, high]; None where it is absent or null."""
    v = data.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise HTTPError(422, f"{key!r} must be a number, got {v!r}", param=key)
    if not low <= v <= high:
        raise HTTPError(422, f"{key!r} must be in [{low}, {high}], got {v}", param=key)
    return kind(v)


def check_items(value: Any, limits: Limits) -> list[Any]:
    if isinstance(value, (str, bytes)):
        value = [value]
    if not isinstance(value, list):
        raise HTTPError(422, f"'inputs' must be a string or a list of strings, got {type(value).__name__}")
    if not value:
        raise HTTPError(422, "'inputs' is an empty list; send at least one input")
    if len(value) > limits.max_items:
        raise HTTPError(413, f"{len(value)} inputs in one request; the limit is {limits.max_items}")
    return value


def threaded_stream(events: Any, media_type: str = "text/event-stream") -> Any:
    """A StreamingResponse of server-sent events (or of what ``media_type`` says: Ollama's JSON lines) made by
    ``events(cancel)`` (a generator of strings, given a ``threading.Event``) in a worker thread of its own. The thread
    always runs the generator to its end or closes it itself, so decoding stops as soon as the client goes away
    (``cancel`` is set then), not when a forgotten generator is collected."""
    import threading

    from fastapi.responses import StreamingResponse

    end = object()

    async def body() -> Any:
        loop, queue, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def produce() -> None:
            try:
                chunks = events(cancel)
                try:
                    for chunk in chunks:
                        put(chunk)
                        if cancel.is_set():
                            break
                finally:
                    chunks.close()
            except Exception as e:  # raised below, in the response
                put(e)
            finally:
                put(end)

        # a thread of its own, not one of the loop's executor: a stream waits on the batches, which decode in that
        # executor (a pool as small as 6 threads on 2 cores: as many waiting streams would leave none to decode)
        threading.Thread(target=produce, daemon=True).start()
        try:
            while (item := await queue.get()) is not end:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancel.set()  # a client gone: the worker stops at the next token

    return StreamingResponse(body(), media_type=media_type)


def request_items(rows: list[dict[str, Any]], opts: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The batcher's items for one request's rows: row ``i`` with seed ``seed + i`` (prompts sent together with a
    temperature are each drawn, not one draw repeated; as ``Generator.complete`` seeds them)."""
    return [(row, {**opts, "seed": opts.get("seed", 0) + i} if i else opts) for i, row in enumerate(rows)]


def open_stream(batcher: Any, row: dict[str, Any], opts: dict[str, Any]) -> Any:
    """Ask ``batcher`` (the service's ``MicroBatcher``) for ``row``'s answer now, streamed: decoded in its batches
    with whatever else is asked at the time, streamed or not, so concurrent streams share one decoding instead of
    each waiting for the one before to finish. Call it in the event loop (an endpoint); it returns ``read(cancel,
    info)``, a generator of the answer's pieces for the response's worker thread, as ``Generator.stream`` gives
    them (``info`` gets ``tokens`` and ``stopped`` at the end; ``cancel`` or closing it stops its row)."""
    from fmtune.tasks.generation import QueuedStream

    stream = QueuedStream()
    answer = asyncio.ensure_future(batcher.submit([(row, opts, stream.sink)]))
    answer.add_done_callback(stream.done)

    def read(cancel: Any = None, info: dict[str, Any] | None = None) -> Any:
        stream.sink.cancel = cancel
        yield from stream.pieces()
        (done,) = answer.result()  # (the batch's error, if it failed)
        if info is not None:
            info["tokens"], info["stopped"] = done.tokens, done.stopped

    return read


def text_tokens(generator: Any, text: str) -> int:
    """The tokens of ``text`` as a generation run's tokenizer splits it (an answer's length, where decoding stopped
    early at a stop string)."""
    return len(generator.bundle.tokenizer(text, add_special_tokens=False)["input_ids"])


async def json_object(request: Any, guard: Any, read_json: Any) -> dict[str, Any]:
    """A request's body, a JSON object, once ``guard`` (the API key, the declared size) lets it through."""
    guard(request)
    data = await read_json(request)
    if not isinstance(data, dict):
        raise HTTPError(422, "expected a JSON object")
    return data
