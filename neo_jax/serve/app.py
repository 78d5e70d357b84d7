"""The HTTP side: aiohttp routes, the bearer-token check, JSON refusals and the request figures.

    POST /v1/generate | /v1/recommend | /v1/search   a JSON body (`neo_jax.serve.schema`) -> ranked
                                                     items and text; 503 until the warm-up is done
    GET  /healthz                                    200 while the process serves
    GET  /readyz                                     200 once every compiled shape is warm, else 503
    GET  /metrics                                    the Prometheus text format (`neo_jax.serve.metrics`)
    GET  /openapi.json                               the OpenAPI description of the endpoints

With a token, every path but /healthz and /readyz needs `Authorization: Bearer <token>` (401
otherwise). Every refusal is `{"error": reason}` with its status; a body over `MAX_BODY_BYTES`
is 413. An unexpected failure is answered 500 with its reason and logged with its traceback;
the server goes on serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from typing import Any

from aiohttp import web

from neo_jax.errors import UserError
from neo_jax.serve.batcher import Batcher
from neo_jax.serve.metrics import CONTENT_TYPE, Metrics
from neo_jax.serve.schema import FIELDS, BadRequest, RequestReader, answer, openapi

MAX_BODY_BYTES = 64 * 1024
OPEN_PATHS = ("/healthz", "/readyz")  # answered without a token: the probes of a process supervisor

log = logging.getLogger("neo_jax.serve")


@dataclasses.dataclass
class Service:
    """What the routes answer from; `warmup` is filled once the warm-up is done."""

    reader: RequestReader
    batcher: Batcher
    metrics: Metrics
    token: str | None
    warmup: dict[str, Any] = dataclasses.field(default_factory=dict)


def create_app(service: Service) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES,
                          middlewares=[_observe(service.metrics), _refusals, _authenticate(service.token)])
    description = openapi(service.reader, service.token is not None)
    app.add_routes([web.post(f"/v1/{endpoint}", _decode_route(service, endpoint), name=endpoint)
                    for endpoint in FIELDS])
    async def healthz(request: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        return _json(*_readiness(service))

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=service.metrics.text(), headers={"Content-Type": CONTENT_TYPE})

    async def description_route(request: web.Request) -> web.Response:
        return _json(200, description)

    app.add_routes([web.get("/healthz", healthz, name="healthz"), web.get("/readyz", readyz, name="readyz"),
                    web.get("/metrics", metrics, name="metrics"),
                    web.get("/openapi.json", description_route, name="openapi")])
    return app


def _decode_route(service: Service, endpoint: str):
    async def route(request: web.Request) -> web.Response:
        if not service.batcher.ready:
            raise BadRequest(503, "not ready: " + _readiness(service)[1]["error"])
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested past Python's limit
            raise BadRequest(400, f"the body is not JSON: {e}") from None
        query = service.reader.read(endpoint, body)
        beams = await asyncio.wrap_future(service.batcher.submit(query.key, query))
        return _json(200, answer(query, beams))

    return route


def _readiness(service: Service) -> tuple[int, dict]:
    """`/readyz`'s status and body."""
    batcher = service.batcher
    if batcher.failure is not None:
        return 503, {"ready": False, "error": f"the warm-up failed: {batcher.failure}"}
    if not batcher.ready:
        return 503, {"ready": False, "error": "warming up: compiling every batch, prompt and beam shape"}
    return 200, {"ready": True, **service.warmup}


def _json(status: int, body: dict) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda value: json.dumps(value, ensure_ascii=False))


def _observe(metrics: Metrics):
    """Count every answer by route and status, with its latency."""

    @web.middleware
    async def observe(request: web.Request, handler):
        start = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            route = request.match_info.route.name
            metrics.observe_request(route or "other", status, time.perf_counter() - start)

    return observe


@web.middleware
async def _refusals(request: web.Request, handler):
    """Every refusal and failure as `{"error": reason}` with its status."""
    try:
        return await handler(request)
    except BadRequest as e:
        return _json(e.status, {"error": e.reason})
    except UserError as e:  # a request the decoder refused that the validation let through
        return _json(422, {"error": str(e)})
    except web.HTTPRequestEntityTooLarge:
        return _json(413, {"error": f"the body is larger than {MAX_BODY_BYTES} bytes"})
    except web.HTTPException as e:  # aiohttp's own: an unknown path or method
        return _json(e.status, {"error": f"{e.reason}: {request.method} {request.path}"})
    except Exception as e:
        log.exception("%s %s failed", request.method, request.path)
        return _json(500, {"error": f"internal error: {type(e).__name__}: {e}"})


def _authenticate(token: str | None):
    """Refuse a request without `Authorization: Bearer <token>` (when there is a token)."""
    expected = None if token is None else f"Bearer {token}".encode()

    @web.middleware
    async def authenticate(request: web.Request, handler):
        if expected is not None and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, expected):
                response = _json(401, {"error": "missing or wrong bearer token: send 'Authorization: Bearer <token>'"})
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        return await handler(request)

    return authenticate
