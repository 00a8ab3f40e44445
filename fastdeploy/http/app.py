"""Routes, the error contract and body limits of one API server process.

Talks only to the service, never to a loop. Every handler is a module-level function
``handler(api, scope, receive) -> Reply``; ``answer`` runs it, turns any error into a
reply (one error contract for every endpoint) and records the request's metrics.
``POST /sync`` takes a plain ASGI path in front of Starlette (``FastDeployApp``): it is
the request a synchronous client makes every time, and Starlette's middleware, routing
and Request/Response objects were a large share of its cost (py-spy, W1 at 64 clients).
``POST /infer``, the same request in the fastDeploy 3.x protocol (``http.infer``), takes
that path too. With ``--cors-origins``, Starlette's CORS middleware stands in front of both.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from typing import AsyncContextManager, AsyncIterator, Awaitable, Callable, NamedTuple, Optional
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastdeploy import bodies, logs, uploads
from fastdeploy.errors import BadRequest, FastDeployError, PayloadTooLarge
from fastdeploy.http.auth import ApiKeys
from fastdeploy.http.infer import Wire
from fastdeploy.http import pages
from fastdeploy.http.openapi import openapi_document
from fastdeploy.jobs import BATCH_BUCKETS
from fastdeploy.metrics import Metrics
from fastdeploy.payloads import Body, ParsedRequest, parse_request, parse_unique_id
from fastdeploy.recipe import Recipe
from fastdeploy.service import SNAPSHOT_SECONDS, Answer, Service
from fastdeploy.settings import Settings
from fastdeploy.status import StatusBoard
from fastdeploy.store import Backend, open_backend
from fastdeploy.tasks import keep_running
from fastdeploy.webhooks import WebhookSender

log = logging.getLogger(__name__)

JSON = "application/json"
SEND_SLICE_BYTES = 1024 * 1024  # a larger answer is sent a slice at a time (see _send)
CORS_HEADERS = ["Authorization", "X-API-Key", "Content-Type", logs.REQUEST_ID_HEADER]  # what a browser client may send
REQUEST_ID = "fastdeploy.request_id"  # the request's id in the ASGI scope where its reply is stamped as it is built
ONLY_ASYNC_REASON = "this server only takes /async requests (ONLY_ASYNC is set); poll /result for the prediction"


class Reply(NamedTuple):
    """An HTTP answer: status, body (in one piece or in parts), extra headers and content type (a
    tuple: built per request)."""

    status: int
    body: bodies.Body
    headers: Optional[dict[str, str]] = None
    media_type: str = JSON

    @classmethod
    def of(cls, answer: Answer) -> "Reply":
        return cls(answer.status, answer.body)


class ClientLeft(Exception):
    """The client closed the connection before its body arrived."""


class ApiProcess:
    """What one API server process owns: store and doorbell, service, webhook sender,
    metrics and the task that keeps its snapshot fresh. Started and stopped with the app."""

    def __init__(self, settings: Settings, recipe: Recipe, metrics_dir: Optional[str]) -> None:
        self.settings = settings
        self.recipe = recipe
        # not strict: the command checked the file at start; an API server restarted after every key was
        # revoked starts refusing them, as the others do, instead of failing to start again and again
        self.keys = ApiKeys(settings.api_keys, settings.api_keys_file, strict=False)
        self._metrics_dir = metrics_dir
        self._backend: Optional[Backend] = None
        self._service: Optional[Service] = None
        self._metrics: Optional[Metrics] = None
        self._status: Optional[StatusBoard] = None
        self._tasks: list[asyncio.Task[None]] = []
        self._parent = os.getppid()

    @property
    def service(self) -> Service:
        assert self._service is not None, "the API process has not started"
        return self._service

    @property
    def metrics(self) -> Metrics:
        assert self._metrics is not None, "the API process has not started"
        return self._metrics

    @functools.lru_cache(maxsize=1)  # noqa: B019 (one ApiProcess per process, alive as long as it)
    def openapi_body(self) -> bytes:
        """The OpenAPI document, built when first asked for (it reads the recipe's example files)."""
        s = self.settings
        return bodies.document(openapi_document(self.recipe, s.allowed_webhook_hosts, s.allow_pickle))

    @property
    def status(self) -> StatusBoard:
        assert self._status is not None, "the API process has not started"
        return self._status

    async def start(self) -> None:
        s = self.settings
        backend = self._backend = open_backend(s.broker, s.state_path, s.spin_seconds)
        self._service = Service(s, self.recipe, backend.store, backend.doorbell)
        self._metrics = Metrics(self.service.snapshot, BATCH_BUCKETS, self._metrics_dir, backend.doorbell.STATS)
        self._status = StatusBoard(self.service, self.metrics.request_summary, self.keys.warnings)
        await self.service.start()
        if self.settings.api_keys_file:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.keys.reload)
        sender = WebhookSender(s, backend.store, self.service.bridge.call)
        self._tasks = [asyncio.create_task(sender.run()),
                       asyncio.create_task(keep_running("the snapshot refresh", self._refresh))]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._service is not None:
            await self._service.stop()
        if self._backend is not None:
            self._backend.close()

    async def _refresh(self) -> float:
        """Keep readiness, queue depth, maintenance and metrics fresh; stop if the supervisor is gone."""
        await self.service.refresh()
        if self._backend is not None:
            self.metrics.track_doorbell(self._backend.doorbell.stats)
        if os.getppid() != self._parent:
            log.warning("the supervisor is gone; stopping")
            os.kill(os.getpid(), signal.SIGTERM)
        return SNAPSHOT_SECONDS


# -- the error contract and the request boundary --------------------------------------
def error_reply(exc: BaseException, endpoint: str) -> Reply:
    """The one mapping from an error to an answer: ours carry status and reason; a client
    that left gets a quiet 499; anything else is logged with its trace and answered 500
    without it."""
    if isinstance(exc, FastDeployError):
        return Reply(exc.status, bodies.failure(exc.reason), exc.headers() or None)
    if isinstance(exc, ClientLeft):
        return Reply(499, b"")  # nobody reads it
    log.error("unexpected error on %s", endpoint, exc_info=exc)
    return Reply(500, bodies.INTERNAL_ERROR)


Handler = Callable[["ApiProcess", Scope, Receive], Awaitable[Reply]]


OWNER = "fastdeploy.owner"  # where the request's owner (see http.auth) is kept in the ASGI scope


async def answer(
    endpoint: str, api: ApiProcess, handler: Handler, scope: Scope, receive: Receive, counted: bool = True,
    public: bool = False,
) -> Reply:
    """Run a handler at the request boundary: the caller is identified (unless the endpoint is
    ``public``), every error becomes a reply, every reply of a ``counted`` endpoint a metric."""
    started = time.perf_counter()
    try:
        if not public:
            scope[OWNER] = api.keys.owner(scope)
        reply = await handler(api, scope, receive)
    except Exception as exc:  # the ASGI boundary: error_reply logs the unexpected with its trace
        reply = error_reply(exc, endpoint)
    if counted:
        api.metrics.observe(endpoint, reply.status, time.perf_counter() - started)
    if log.isEnabledFor(logging.DEBUG):  # an access line (with the request's id, and its job's) only at debug
        log.debug("%s %r answered %d in %.1f ms", scope["method"], scope["path"], reply.status,
                  (time.perf_counter() - started) * 1000)
    return reply


async def read_body(scope: Scope, receive: Receive, limit: int) -> Body:
    """The body, refusing (413) anything over the limit as soon as it passes it.

    A body in one piece is handed on as it came; a body in many pieces is gathered in one
    growing buffer, not in a list joined at the end (which held it twice at once).
    """
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise PayloadTooLarge(f"the request body is {int(value)} bytes; the limit is {limit} bytes (max_body_mb)")
    gathered: Optional[bytearray] = None
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientLeft()
        chunk: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        if gathered is None and not more:
            if len(chunk) > limit:
                raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes (max_body_mb)")
            return chunk
        gathered = bytearray() if gathered is None else gathered
        if len(gathered) + len(chunk) > limit:
            raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes (max_body_mb)")
        gathered += chunk
        if not more:
            return gathered


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# -- handlers ---------------------------------------------------------------------------
async def sync_handler(api: ApiProcess, scope: Scope, receive: Receive) -> Reply:
    s = api.settings
    if s.only_async:
        raise BadRequest(ONLY_ASYNC_REASON)
    if _multipart(api, scope):
        async with _upload(api, scope, receive, sync=True) as request:
            return Reply.of(await api.service.predict_sync(
                request, scope[OWNER], functools.partial(_disconnected, receive)))
    # no local keeps the parsed request: the service drops it once the job's payload is made
    return Reply.of(await api.service.predict_sync(
        parse_request(await read_body(scope, receive, s.max_body_bytes), file_mode=api.recipe.is_file, sync=True,
                      max_items=s.max_per_client_batch),
        scope[OWNER], functools.partial(_disconnected, receive),
    ))


async def infer_handler(api: ApiProcess, scope: Scope, receive: Receive) -> Reply:
    """POST /infer, the fastDeploy 3.x protocol (``http.infer``), on the same path as /sync. Every
    answer, a refusal or a 401 too, is in the client's own serialisation: the route is public at
    the boundary, and the key is checked here instead."""
    s = api.settings
    wire = Wire.from_query(scope.get("query_string", b""))
    try:
        scope[OWNER] = api.keys.owner(scope)
        if s.only_async:
            raise BadRequest(ONLY_ASYNC_REASON)
        request = wire.request(
            await read_body(scope, receive, s.max_body_bytes), file_mode=api.recipe.is_file,
            max_items=s.max_per_client_batch, max_bytes=s.max_body_bytes, allow_pickle=s.allow_pickle,
        )
        done = await api.service.wait_sync(
            request, scope[OWNER], functools.partial(_disconnected, receive), timeout=wire.timeout
        )
    except FastDeployError as exc:
        status, body, media_type, headers = wire.refusal(exc)
        return Reply(status, body, headers or None, media_type)
    if done.status == 499:
        return Reply(499, b"")  # nobody reads it
    status, body, media_type = wire.answer(done, request.keys)
    return Reply(status, body, None, media_type)


async def async_handler(api: ApiProcess, scope: Scope, receive: Receive) -> Reply:
    s = api.settings
    if _multipart(api, scope):
        async with _upload(api, scope, receive, sync=False) as request:
            return Reply(200, bodies.accepted(await api.service.submit_async(request, scope[OWNER])))
    unique_id = await api.service.submit_async(parse_request(
        await read_body(scope, receive, s.max_body_bytes), file_mode=api.recipe.is_file, sync=False,
        max_items=s.max_per_client_batch, allowed_webhook_hosts=s.allowed_webhook_hosts,
        allow_private_webhooks=s.webhook_allow_private,
    ), scope[OWNER])
    return Reply(200, bodies.accepted(unique_id))


def _multipart(api: ApiProcess, scope: Scope) -> bool:
    """Whether the body is multipart/form-data: files streamed to disk (``uploads``), FILE recipes only."""
    content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
    if not uploads.is_multipart(content_type):
        return False
    if not api.recipe.is_file:
        raise BadRequest('this recipe takes JSON inputs: multipart/form-data is for FILE recipes; send '
                         'Content-Type: application/json with {"data": [...]}')
    return True


def _upload(api: ApiProcess, scope: Scope, receive: Receive, sync: bool) -> AsyncContextManager[ParsedRequest]:
    """The upload, once the service would take its job: a refusal comes before the body is streamed, not after."""
    api.service.check_accepting(scope[OWNER])
    headers = dict(scope["headers"])
    length = headers.get(b"content-length", b"")
    return uploads.uploaded_request(headers.get(b"content-type", b""), int(length) if length.isdigit() else None,
                                    receive, api.settings, sync=sync)


async def result_handler(api: ApiProcess, scope: Scope, receive: Receive) -> Reply:
    unique_id = parse_unique_id(await read_body(scope, receive, api.settings.max_body_bytes))
    return Reply.of(await api.service.result(unique_id, _reader(api, scope)))


async def cancel_handler(api: ApiProcess, scope: Scope, receive: Receive) -> Reply:
    unique_id = parse_unique_id(await read_body(scope, receive, api.settings.max_body_bytes))
    return Reply.of(await api.service.cancel(unique_id, _reader(api, scope)))


def _reader(api: ApiProcess, scope: Scope) -> Optional[str]:
    """Whose jobs this request may see and cancel: with keys its own only; without, any."""
    return scope[OWNER] if api.keys.enabled else None


async def health_handler(api: ApiProcess, scope: Scope, receive: Receive) -> Reply:
    return Reply(200, bodies.ALIVE)


async def ready_handler(api: ApiProcess, scope: Scope, receive: Receive) -> Reply:
    reason = api.service.not_ready_reason()
    if reason is None:
        return Reply(200, bodies.READY)
    if api.keys.enabled:  # /ready needs no key: tell strangers no more than that (the log and /meta say why)
        reason = "not ready; the reason is in the server log"
    return Reply(503, bodies.failure(reason), {"Retry-After": "1"})


async def meta_handler(api: ApiProcess, scope: Scope, receive: Receive) -> Reply:
    document = api.service.meta()
    document["is_pickle_allowed"] = api.settings.allow_pickle  # what fdclient 3.x asks (?is_pickle_allowed=)
    return Reply(200, bodies.document(document))


async def metrics_handler(api: ApiProcess, scope: Scope, receive: Receive) -> Reply:
    return Reply(200, api.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi_handler(api: ApiProcess, scope: Scope, receive: Receive) -> Reply:
    return Reply(200, api.openapi_body())


async def status_handler(api: ApiProcess, scope: Scope, receive: Receive) -> Reply:
    """GET /status.json: what the status page shows (``fastdeploy.status``); a key sees its own failures."""
    owner = scope[OWNER] if api.keys.enabled else None
    return Reply(200, bodies.document(await api.status.document(owner)), {"Cache-Control": "no-store"})


async def status_page_handler(api: ApiProcess, scope: Scope, receive: Receive) -> Reply:
    return _own("status.html")


async def docs_page_handler(api: ApiProcess, scope: Scope, receive: Receive) -> Reply:
    return _own("docs.html")


async def static_handler(api: ApiProcess, scope: Scope, receive: Receive) -> Reply:
    return _own(scope["path_params"]["name"])


def _own(name: str) -> Reply:
    """One of our pages or their assets (they change with each version: never cached unchecked)."""
    asset = pages.own(name)
    return Reply(200, asset.body, pages.PAGE_HEADERS, asset.media_type)


async def swagger_handler(api: ApiProcess, scope: Scope, receive: Receive) -> Reply:
    asset = pages.swagger(scope["path_params"]["name"])
    return Reply(200, asset.body, pages.ASSET_HEADERS, asset.media_type)


# -- Starlette glue ---------------------------------------------------------------------
def _route(path: str, endpoint: str, handler: Handler, counted: bool = True, public: bool = False) -> Route:
    """A Starlette route for a handler; ``endpoint`` names it in logs and, when ``counted``, in the
    request metrics; a ``public`` one needs no API key."""

    async def run(scope: Scope, receive: Receive, send: Send) -> None:  # an ASGI endpoint: bodies in parts too
        api: ApiProcess = scope["app"].state.api
        await _send(send, await answer(endpoint, api, handler, scope, receive, counted, public))

    return Route(path, _Asgi(run), methods=["GET"] if handler not in _POSTS else ["POST"])


class _Asgi:
    """An ASGI callable Starlette's Route takes as an app (a plain function it would wrap as a
    request -> response endpoint)."""

    def __init__(self, run: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self._run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._run(scope, receive, send)


_POSTS = {sync_handler, infer_handler, async_handler, result_handler, cancel_handler}


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown path, wrong method) in our shape, with their headers
    (a 405 carries ``Allow``: the methods the route takes, as HTTP requires)."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal server error"
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
    if status == 404:
        detail = f"no endpoint {request.url.path}; see GET /openapi.json for the endpoints"
    elif status == 405:
        allowed = sorted(m.strip() for m in headers.get("Allow", "").split(",") if m.strip())
        headers["Allow"] = ", ".join(allowed)
        detail = f"{request.method} is not allowed on {request.url.path}; use {' or '.join(allowed)}"
    return Response(bodies.failure(detail), status_code=status, media_type=JSON, headers=headers or None)


async def _send(send: Send, reply: Reply, request_id: Optional[str] = None) -> None:
    """Send a reply. A body in parts, or larger than ``SEND_SLICE_BYTES``, goes out a slice at a
    time: the server waits for the socket to take each one, so no copy of a large answer builds
    up in its write buffer while a client reads slowly."""
    parts = (reply.body,) if isinstance(reply.body, bytes) else reply.body
    length = sum(len(part) for part in parts)
    headers = [(b"content-type", reply.media_type.encode()), (b"content-length", str(length).encode())]
    if reply.headers:
        headers += [(k.lower().encode(), v.encode()) for k, v in reply.headers.items()]
    if request_id is not None:
        headers.append((b"x-request-id", request_id.encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    if length <= SEND_SLICE_BYTES:  # nearly every answer: one message
        await send({"type": "http.response.body", "body": parts[0] if len(parts) == 1 else b"".join(parts)})
        return
    sent = 0
    for part in parts:
        view = memoryview(part)
        for start in range(0, len(view), SEND_SLICE_BYTES):
            piece = bytes(view[start:start + SEND_SLICE_BYTES])
            sent += len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": sent < length})


def _stamped(send: Send, request_id: str) -> Send:
    """``send`` that adds ``X-Request-ID`` to a reply's head, for replies built elsewhere (Starlette's
    routes and errors, the CORS middleware's preflights)."""
    header = (b"x-request-id", request_id.encode())

    async def stamp(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), header]}
        await send(message)

    return stamp


class FastDeployApp:
    """The ASGI app of one API server process: POST /sync answered directly, the rest by Starlette."""

    def __init__(self, settings: Settings, recipe: Recipe, metrics_dir: Optional[str] = None) -> None:
        self.api = ApiProcess(settings, recipe, metrics_dir)
        if settings.api_keys_file:  # until the app has started and handles it, a reload must not kill us
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        routes = [
            _route("/sync", "sync", sync_handler),  # other methods than POST: a 405 from Starlette
            _route("/infer", "infer", infer_handler, public=True),  # checks the key itself (infer_handler)
            _route("/async", "async", async_handler),
            _route("/result", "result", result_handler),
            _route("/cancel", "cancel", cancel_handler),
            _route("/health", "health", health_handler, public=True),
            _route("/ready", "ready", ready_handler, public=True),
            _route("/meta", "meta", meta_handler),
            _route("/metrics", "metrics", metrics_handler, counted=False, public=settings.metrics_open),
            _route("/prometheus_metrics", "metrics", metrics_handler, counted=False, public=settings.metrics_open),
            _route("/openapi.json", "openapi", openapi_handler, counted=False),
            _route("/status.json", "status", status_handler, counted=False),
            _route("/", "status_page", status_page_handler, counted=False, public=True),
            _route("/docs", "docs", docs_page_handler, counted=False, public=True),
            _route("/static/{name}", "static", static_handler, counted=False, public=True),
            _route("/docs/{name}", "docs_asset", swagger_handler, counted=False, public=True),
        ]
        self.framework = Starlette(
            routes=routes, lifespan=self._lifespan, exception_handlers={HTTPException: http_error}
        )
        self.framework.state.api = self.api
        self._cors: Optional[ASGIApp] = None  # answers preflights itself, before any key is asked for
        if settings.cors_origin_list:
            self._cors = CORSMiddleware(
                self._dispatch, allow_origins=settings.cors_origin_list, allow_methods=["GET", "POST"],
                allow_headers=CORS_HEADERS, max_age=600,
                expose_headers=["Retry-After", "WWW-Authenticate", logs.REQUEST_ID_HEADER],
            )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.api.start()
        try:
            yield
        finally:
            await self.api.stop()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # the lifespan
            await (self._cors or self._dispatch)(scope, receive, send)
            return
        request_id = logs.request_id(scope["headers"])  # this request's log lines carry it from here
        if self._cors is not None:  # it answers preflights itself: every reply is stamped on its way out
            await self._cors(scope, receive, _stamped(send, request_id))
        else:
            scope[REQUEST_ID] = request_id
            await self._dispatch(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /sync and POST /infer (3.x clients send nothing else) straight to their handlers."""
        request_id: Optional[str] = scope.get(REQUEST_ID)  # None: stamped on the way out, or the lifespan
        if scope["type"] == "http" and scope["method"] == "POST":
            if scope["path"] == "/sync" and not _speaks_3x(scope):
                await _send(send, await answer("sync", self.api, sync_handler, scope, receive), request_id)
                return
            if scope["path"] in ("/infer", "/sync"):
                await _send(send, await answer("infer", self.api, infer_handler, scope, receive, public=True),
                            request_id)
                return
        await self.framework(scope, receive, send if request_id is None else _stamped(send, request_id))


def _speaks_3x(scope: Scope) -> bool:
    """Whether a POST /sync is in the fastDeploy 3.x protocol, which 3.x served on /sync as on
    /infer: it names its serialisation in the query (the original API's /sync has no query)."""
    query = scope.get("query_string", b"")
    return bool(query) and not {"input_type", "compressed"}.isdisjoint(
        parse_qs(query.decode("latin-1"), keep_blank_values=True))


def create_app(settings: Settings, recipe: Recipe, metrics_dir: Optional[str] = None) -> ASGIApp:
    """The ASGI app of one API server process; its store opens when the app starts.

    ``metrics_dir``: the folder the API server processes of one service share their
    request metrics through (see ``Metrics``).
    """
    return FastDeployApp(settings, recipe, metrics_dir)
