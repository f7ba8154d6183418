"""`rewardctl serve`: an HTTP scoring server for RL loops, on FastAPI + uvicorn (the `serve` extra).

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at run time.

The model is loaded once (``training.scorer``) and scores exactly as ``rewardctl score`` does.
Concurrent requests are micro-batched: requests arriving within ``max_wait_ms`` of each other (up to
``max_batch_rows`` rows) share one pass of the model, which runs on one worker thread while the event
loop keeps accepting requests. A batch that holds a bad row is re-scored request by request, so only
the request with the bad row gets its 400.

Endpoints:
- ``POST /score``: ``{"texts": [...]}`` or ``{"messages": [[{role, content}, ...], ...]}`` ->
  ``{"rewards": [...]}``; ``{"rows": [...]}`` (any row shape ``rewardctl score`` reads) ->
  ``{"scores": [...]}``; ``"normalize": true`` returns ``(r - mean) / std``.
- ``POST /get_reward``: OpenRLHF's remote reward model, ``{"query": [...]}`` -> ``{"rewards": [...]}``.
- ``GET /health``, ``GET /info`` (method, model, normalisation, max length, batching counters).
"""

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from rewardctl.config.schema import BadRows, Overlength
from rewardctl.config.validate import to_serve_config
from rewardctl.data.loading import dataset_from_records
from rewardctl.errors import ConfigError, RewardctlError
from rewardctl.training.scorer import Scorer, open_model_source

log = logging.getLogger(__name__)


class BadRequest(Exception):
    """A request the server refuses with a 4xx status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Pending:
    rows: list[dict[str, Any]]
    normalize: bool
    future: asyncio.Future


@dataclass
class Counters:
    requests: int = 0
    rows: int = 0
    batches: int = 0
    largest_batch_rows: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "rows": self.rows,
            "batches": self.batches,
            "largest_batch_rows": self.largest_batch_rows,
        }


class MicroBatcher:
    """Collects concurrent requests into one model pass (see the module docstring)."""

    def __init__(self, scorer: Scorer, max_batch_rows: int, max_wait_ms: float) -> None:
        self.scorer = scorer
        self.max_batch_rows = max_batch_rows
        self.max_wait = max_wait_ms / 1000
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewardctl-score")
        self.counters = Counters()

    async def submit(self, rows: list[dict[str, Any]], normalize: bool) -> list[dict[str, Any] | None]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(Pending(rows, normalize, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while sum(len(p.rows) for p in batch) < self.max_batch_rows:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(deadline - loop.time(), 0)))
                except asyncio.TimeoutError:
                    break
            results = await loop.run_in_executor(self.worker, self.score_batch, batch)
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    if isinstance(result, Exception):
                        pending.future.set_exception(result)
                    else:
                        pending.future.set_result(result)

    def stopped(self, task: asyncio.Task) -> None:
        """The batching task ended (cancelled at shutdown, or a bug): say so, and fail what waits."""
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("the batching task failed: %r; requests can no longer be scored", error)
        while not self.queue.empty():
            pending = self.queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(BadRequest(503, "the server can no longer score; restart it"))

    def score_batch(self, batch: list[Pending]) -> list[Any]:
        """One pass over every request's rows; requests asking for normalisation get it per row."""
        rows = [row for pending in batch for row in pending.rows]
        with self.counters.lock:
            self.counters.batches += 1
            self.counters.largest_batch_rows = max(self.counters.largest_batch_rows, len(rows))
        try:
            columns = self._score(rows)
        except Exception as exc:  # noqa: BLE001 - whatever one request causes, the batcher must go on serving
            if len(batch) > 1:
                return [self.score_batch([pending])[0] for pending in batch]  # only the bad request fails
            if isinstance(exc, RewardctlError):
                return [BadRequest(400, str(exc).replace("request, ", "", 1))]
            log.exception("scoring a request failed")
            return [BadRequest(500, f"scoring failed: {type(exc).__name__}: {exc}")]
        results, start = [], 0
        for pending in batch:
            part = columns[start : start + len(pending.rows)]
            start += len(pending.rows)
            if pending.normalize:
                part = [self.scorer.normalized(c) if c is not None else None for c in part]
            results.append(part)
        return results

    def _score(self, rows: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
        return self.scorer.score(dataset_from_records(rows), "request").columns


def rows_of(body: Any) -> tuple[list[dict[str, Any]], str]:
    """The rows a /score body asks for, and which reply it wants (``rewards`` or ``scores``)."""
    if not isinstance(body, dict):
        raise BadRequest(400, "the body must be a JSON object")
    if "texts" in body:
        texts = body["texts"]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise BadRequest(400, "'texts' must be a list of strings")
        return [{"response": t} for t in texts], "rewards"
    if "messages" in body:
        conversations = body["messages"]
        if not isinstance(conversations, list) or not all(isinstance(c, list) and c for c in conversations):
            raise BadRequest(400, "'messages' must be a list of chat message lists")
        return [{"response": c} for c in conversations], "rewards"
    if "rows" in body:
        rows = body["rows"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise BadRequest(400, "'rows' must be a list of JSON objects")
        return rows, "scores"
    raise BadRequest(400, "the body needs one of 'texts', 'messages' or 'rows'")


@dataclass
class Limits:
    """What one request may ask for, and how requests are batched."""

    max_batch_rows: int
    max_wait_ms: float
    max_request_rows: int
    max_body_bytes: int


class ScoringService:
    """What the endpoints do, apart from the web framework: read a body, check its size, score."""

    def __init__(self, scorer: Scorer, limits: Limits) -> None:
        self.scorer, self.limits = scorer, limits
        self.batcher = MicroBatcher(scorer, limits.max_batch_rows, limits.max_wait_ms)

    def info(self) -> dict[str, Any]:
        return {
            **self.scorer.describe(),
            "max_batch_rows": self.limits.max_batch_rows,
            "max_wait_ms": self.limits.max_wait_ms,
            "max_request_rows": self.limits.max_request_rows,
            "served": self.batcher.counters.as_dict(),
        }

    async def body(self, request: Any) -> Any:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BadRequest(413, f"the body is over {limit} bytes (max_body_bytes)")
        raw = await request.body()
        if len(raw) > limit:
            raise BadRequest(413, f"the body is over {limit} bytes (max_body_bytes)")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(400, f"the body is not valid JSON ({exc})") from None

    async def scored(self, rows: list[dict[str, Any]], normalize: bool) -> list[dict[str, Any] | None]:
        if not rows:
            raise BadRequest(400, "no rows to score")
        if len(rows) > self.limits.max_request_rows:
            raise BadRequest(
                413, f"{len(rows)} rows is over max_request_rows={self.limits.max_request_rows}; split the request"
            )
        if normalize and self.scorer.normalization is None:
            raise BadRequest(400, "the model holds no reward statistics: normalize is not available")
        counters = self.batcher.counters
        with counters.lock:
            counters.requests += 1
            counters.rows += len(rows)
        return await self.batcher.submit(rows, normalize)

    def plain_rewards(self, columns: list[dict[str, Any] | None]) -> list[Any]:
        if any(c is None or "reward" not in c for c in columns):
            name = self.scorer.run.method.name
            raise BadRequest(400, f"a {name} model gives no single reward per text; post 'rows' to /score")
        return [c["reward"] for c in columns]

    async def score(self, request: Any) -> dict[str, Any]:
        body = await self.body(request)
        rows, reply = rows_of(body)
        columns = await self.scored(rows, bool(body.get("normalize", False)))
        return {"rewards": self.plain_rewards(columns)} if reply == "rewards" else {"scores": columns}

    def plain_text(self, query: str) -> str:
        """An OpenRLHF query is a decoded sequence with its special tokens: padding around it and a
        leading BOS are removed (tokenising adds the BOS again; the EOS is appended as in training)."""
        tokenizer = self.scorer.method.tokenizer
        pad, bos = tokenizer.pad_token, tokenizer.bos_token
        ends = [t for t in (pad, tokenizer.eos_token) if t]
        while any(query.endswith(t) for t in ends):
            query = query[: -len(next(t for t in ends if query.endswith(t)))]
        while pad and query.startswith(pad):
            query = query[len(pad) :]
        if bos and query.startswith(bos):
            query = query[len(bos) :]
        return query

    async def get_reward(self, request: Any) -> dict[str, Any]:
        body = await self.body(request)
        queries = body.get("query") if isinstance(body, dict) else None
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise BadRequest(400, "'query' must be a list of strings")
        rows = [{"response": self.plain_text(q)} for q in queries]
        columns = await self.scored(rows, bool(body.get("normalize", False)))
        return {"rewards": self.plain_rewards(columns)}


def build_app(scorer: Scorer, limits: Limits) -> Any:
    """The FastAPI application (imported here: the `serve` extra is optional)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    service = ScoringService(scorer, limits)

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        task = asyncio.create_task(service.batcher.run())
        task.add_done_callback(service.batcher.stopped)
        yield
        task.cancel()
        service.batcher.worker.shutdown(wait=False)

    app = FastAPI(title="rewardctl serve", lifespan=lifespan)

    @app.exception_handler(BadRequest)
    async def refuse(_: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.post("/score")
    async def score(request: Request) -> dict[str, Any]:
        return await service.score(request)

    @app.post("/get_reward")
    async def get_reward(request: Request) -> dict[str, Any]:
        return await service.get_reward(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return service.info()

    return app


def serve(cfg: DictConfig) -> None:
    sv = to_serve_config(cfg)
    try:
        import uvicorn
    except ImportError:
        raise ConfigError(
            "serve", "needs the serve extra: pip install 'rewardctl[serve]' (FastAPI + uvicorn)"
        ) from None
    scorer = open_model_source(sv, batch_size=sv.max_batch_rows).load()
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # one tokenising bar per request would flood the server's log
    scorer.run.data.bad_rows = BadRows.error  # a bad row is the request's 400, never a silent null
    scorer.run.data.overlength = Overlength.truncate  # a long text is truncated as in training, never dropped
    scorer.run.data.num_proc = None  # tokenising a micro-batch in a process pool would cost more than it saves
    if scorer.accelerator.num_processes > 1:
        raise ConfigError("serve", "runs as one process; start one server per GPU behind a load balancer")
    app = build_app(scorer, Limits(sv.max_batch_rows, sv.max_wait_ms, sv.max_request_rows, sv.max_body_bytes))
    log.info("serving %s (%s) on http://%s:%d", scorer.path, scorer.run.method.name, sv.host, sv.port)
    uvicorn.run(app, host=sv.host, port=sv.port, log_level="warning")
