"""Routes, error mapping and body limits. Talks only to the service, never to a loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fastdeploy.errors import BadRequest, FastDeployError, PayloadTooLarge
from fastdeploy.http.openapi import openapi_document
from fastdeploy.jobs import BATCH_BUCKETS
from fastdeploy.metrics import Metrics
from fastdeploy.payloads import parse_request, parse_unique_id
from fastdeploy.recipe import Recipe
from fastdeploy.service import SNAPSHOT_SECONDS, Service
from fastdeploy.settings import Settings
from fastdeploy.store import open_store
from fastdeploy.webhooks import WebhookSender

log = logging.getLogger(__name__)

JSON = "application/json"
ONLY_ASYNC_REASON = "this server only takes /async requests (ONLY_ASYNC is set); poll /result for the prediction"
Handler = Callable[[Request], Awaitable[Response]]


def json_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, media_type=JSON, headers=headers)


def _error_parts(exc: FastDeployError) -> tuple[int, bytes, Optional[dict[str, str]]]:
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after is not None else None
    return exc.status, orjson.dumps({"success": False, "reason": exc.reason}), headers


def error_response(exc: FastDeployError) -> Response:
    return json_response(*_error_parts(exc))


_INTERNAL_ERROR = b'{"success":false,"reason":"internal server error; see the server log"}'


class _AsgiEndpoint:
    """Lets Starlette route to a plain ASGI function (it wraps bare functions as request handlers)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


class _ClientLeft(Exception):
    """The client closed the connection before its body arrived."""


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The body, refusing (413) anything over the limit before reading it all."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise PayloadTooLarge(f"the request body is {int(value)} bytes; the limit is {limit} bytes (max_body_mb)")
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientLeft()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes (max_body_mb)")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _asgi_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_json(send: Send, status: int, body: bytes, headers: Optional[dict[str, str]] = None) -> None:
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings, recipe: Recipe, metrics_dir: Optional[str] = None) -> ASGIApp:
    """The ASGI app of one API server process; the store opens when the app starts.

    ``POST /sync`` is answered by a plain ASGI handler in front of Starlette: it is the
    request a synchronous client makes every time, and Starlette's middleware, routing
    and Request/Response objects were a large share of its cost (py-spy, W1 at 64
    clients). Every other route, and every other method on /sync, goes to Starlette.

    ``metrics_dir``: the folder the API server processes of one service share their
    request metrics through (see ``Metrics``).
    """
    state: dict[str, Any] = {}

    def service() -> Service:
        return state["service"]

    def metrics() -> Metrics:
        return state["metrics"]

    def measured(endpoint: str, handler: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except FastDeployError as exc:
                response = error_response(exc)
            except _ClientLeft:
                response = json_response(499, b"")  # nobody reads it
            except Exception:  # the boundary: log the trace, answer without it
                log.exception("unexpected error on %s", endpoint)
                response = json_response(500, _INTERNAL_ERROR)
            metrics().observe(endpoint, response.status_code, time.perf_counter() - started)
            return response

        return wrapped

    file_mode = recipe.is_file
    limit = settings.max_body_bytes

    async def async_(request: Request) -> Response:
        parsed = parse_request(
            await read_body(request.scope, request.receive, limit), file_mode=file_mode, sync=False,
            max_items=settings.max_per_client_batch, allowed_webhook_hosts=settings.allowed_webhook_hosts,
        )
        unique_id = await service().submit_async(parsed)
        return json_response(200, b'{"success":true,"unique_id":' + orjson.dumps(unique_id) + b"}")

    async def result(request: Request) -> Response:
        answer = await service().result(parse_unique_id(await read_body(request.scope, request.receive, limit)))
        return json_response(answer.status, answer.body)

    async def health(request: Request) -> Response:
        return json_response(200, b'{"success":true,"status":"alive"}')

    async def ready(request: Request) -> Response:
        reason = service().not_ready_reason()
        if reason is None:
            return json_response(200, b'{"success":true,"status":"ready"}')
        return json_response(503, orjson.dumps({"success": False, "reason": reason}), {"Retry-After": "1"})

    async def meta(request: Request) -> Response:
        return json_response(200, orjson.dumps(service().meta()))

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics().render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def openapi(request: Request) -> Response:
        return json_response(200, orjson.dumps(openapi_document(recipe)))

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal server error"
        if status == 404:
            detail = f"no endpoint {request.url.path}; see GET /openapi.json for the endpoints"
        elif status == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return json_response(status, orjson.dumps({"success": False, "reason": detail}))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = open_store(settings.broker, settings.state_path)
        measures = state["metrics"] = Metrics(lambda: svc.snapshot(), BATCH_BUCKETS, metrics_dir)
        svc = Service(settings, recipe, store, on_spin=measures.spin.inc)
        state["service"] = svc
        await svc.start()
        sender = WebhookSender(settings, store, svc.bridge.call)
        tasks = [asyncio.create_task(sender.run()), asyncio.create_task(_refresh_forever(svc))]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await svc.stop()
            store.close()

    routes = [
        # POST /sync is answered before Starlette (below); the route makes other methods a 405
        Route("/sync", _AsgiEndpoint(lambda *asgi: sync_front_door(*asgi)), methods=["POST"]),
        Route("/async", measured("async", async_), methods=["POST"]),
        Route("/result", measured("result", result), methods=["POST"]),
        Route("/health", measured("health", health), methods=["GET"]),
        Route("/ready", measured("ready", ready), methods=["GET"]),
        Route("/meta", measured("meta", meta), methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    framework = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})

    async def sync_front_door(scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers: Optional[dict[str, str]] = None
        try:
            if settings.only_async:
                raise BadRequest(ONLY_ASYNC_REASON)
            parsed = parse_request(
                await read_body(scope, receive, limit), file_mode=file_mode, sync=True,
                max_items=settings.max_per_client_batch,
            )
            answer = await service().predict_sync(parsed, functools.partial(_asgi_disconnected, receive))
            status, body = answer.status, answer.body
        except _ClientLeft:
            status, body = 499, b""  # nobody reads it
        except FastDeployError as exc:
            status, body, headers = _error_parts(exc)
        except Exception:  # the boundary: log the trace, answer without it
            log.exception("unexpected error on sync")
            status, body = 500, _INTERNAL_ERROR
        metrics().observe("sync", status, time.perf_counter() - started)
        await _send_json(send, status, body, headers)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/sync":
            await sync_front_door(scope, receive, send)
        else:
            await framework(scope, receive, send)

    return app


async def _refresh_forever(svc: Service) -> None:
    """Keep readiness, queue depth and maintenance fresh; stop if the supervisor is gone."""
    parent = os.getppid()
    while True:
        await asyncio.sleep(SNAPSHOT_SECONDS)
        await svc.refresh()
        if os.getppid() != parent:
            log.warning("the supervisor is gone; stopping")
            os.kill(os.getpid(), signal.SIGTERM)
            return
