"""The server's lifecycle: listen, warm up in the batcher's worker, answer, stop.

    server = Server(generator, ShapePlan(max_batch=16), host="127.0.0.1", port=0, token=None)
    await server.start()          # listening (port 0: a free one, in `server.port`); warming up
    ...                           # /readyz says ready once `server.batcher.warm` is set
    await server.stop()

`run_forever` is the foreground form (`neo-jax serve`: until SIGINT or SIGTERM);
`BackgroundServer` runs one on its own event loop in a thread (tests and `bench serve`).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time

from aiohttp import web

from neo_jax.decode.generate import Generator
from neo_jax.errors import UserError
from neo_jax.serve.app import Service, create_app
from neo_jax.serve.batcher import Batcher
from neo_jax.serve.engine import Engine, ShapePlan, compiles
from neo_jax.serve.metrics import Metrics
from neo_jax.serve.schema import RequestReader


class Server:
    def __init__(self, generator: Generator, plan: ShapePlan, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, max_wait_ms: float = 10.0):
        check_options(port, max_wait_ms)
        self.host, self.port = host, port
        self._compiles_at_ready: int | None = None
        self.metrics = Metrics(plan.batch_sizes, self._compiles_after_ready)
        self.engine = Engine(generator, plan, self.metrics)
        self.batcher = Batcher(self.engine.run, plan.max_batch, max_wait_ms / 1000, start=self._warm_up)
        self.service = Service(RequestReader(self.engine), self.batcher, self.metrics, token)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _warm_up(self) -> None:
        start = time.perf_counter()
        shapes = self.engine.warm_up()
        self.service.warmup.update(shapes=shapes, warmup_seconds=round(time.perf_counter() - start, 3))
        self._compiles_at_ready = compiles()
        self.metrics.set_ready()

    def _compiles_after_ready(self) -> int:
        return 0 if self._compiles_at_ready is None else compiles() - self._compiles_at_ready

    async def start(self) -> None:
        """Listen, then start the worker, which warms up before it takes requests."""
        sock = _listen(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(create_app(self.service), access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        self.batcher.start()

    async def stop(self) -> None:
        """Stop listening, let the requests in flight finish, then end the worker."""
        if self._runner is not None:
            await self._runner.cleanup()
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.stop)


def check_options(port: int, max_wait_ms: float) -> None:
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be 0..65535 (0: a free port), got {port}")
    if max_wait_ms < 0:
        raise UserError(f"--max-wait-ms must not be negative, got {max_wait_ms}")


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host:port`, or a `UserError` saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:  # socket.gaierror included
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


async def run_forever(server: Server) -> None:
    """Serve until SIGINT or SIGTERM; prints a JSON line when listening and one when ready. A failed
    warm-up stops the server and raises its error."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    await server.start()
    print(json.dumps({"listening": server.url, "ready": False}), flush=True)
    try:
        while not (server.batcher.warm.is_set() or stopped.is_set()):
            await asyncio.sleep(0.05)
        if server.batcher.failure is not None:
            raise server.batcher.failure
        if not stopped.is_set():
            print(json.dumps({"listening": server.url, "ready": True, **server.service.warmup}), flush=True)
            await stopped.wait()
    finally:
        await server.stop()


class BackgroundServer:
    """A `Server` on its own event loop in a daemon thread.

        with BackgroundServer(server) as background:
            background.wait_ready(timeout=600)
            ... HTTP to server.url ...
    """

    def __init__(self, server: Server):
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="neo-jax-serve", daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result()
        except BaseException:
            self._close()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Wait for the warm-up; raise what it raised, or `TimeoutError`."""
        if not self.server.batcher.warm.wait(timeout):
            raise TimeoutError(f"the server was not warm after {timeout} s")
        if self.server.batcher.failure is not None:
            raise self.server.batcher.failure

    def __exit__(self, *exc) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result()
        finally:
            self._close()

    def _close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
