"""`neo-jax bench serve --bundle DIR`: the HTTP server's throughput and latency, batched and not.

The server of `neo-jax serve` starts in-process on a free localhost port and warms up (not
timed). Then two phases of `--seconds` each: `--clients` concurrent clients, each sending its
next request as soon as its last is answered; then one client alone. Every request is a seeded
`POST /v1/recommend`: a history of `--history` random items of one entity type, the next item of
that type, `exclude_history`, `--beam` beams. Each answered item is checked by the client: it
must be a catalog item of the asked type and not in the history (`invalid_items`, must be 0).

Prints one JSON object: per phase the requests answered, requests/s (over the phase's wall time,
the requests in flight at its end included), p50/p99 latency in ms, errors (any answer but 200),
invalid items and the mean batch size (the server's queries per decode call in that phase); and
`throughput_ratio`, the concurrent phase's requests/s over the single client's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
import numpy as np

from neo_jax.errors import UserError
from neo_jax.export.bundle import load_bundle
from neo_jax.serve.commands import add_plan_arguments, plan_from_arguments
from neo_jax.serve.server import BackgroundServer, Server
from neo_jax.sharding import add_mesh_arguments, mesh_from_arguments

WARMUP_TIMEOUT_S = 3600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="a serving bundle directory written by `neo-jax export`")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients of the first phase (default 32)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase (default 20)")
    parser.add_argument("--history", type=int, default=5, help="history items per request (default 5)")
    parser.add_argument("--beam", type=int, default=None, help="beams per request (default: the first of --beams)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the requests")
    add_plan_arguments(parser)
    add_mesh_arguments(parser)


def _requests(server: Server, history: int, beam: int, seed: int) -> list[dict]:
    """1,000 seeded recommend bodies over the entity types that have enough items for them."""
    sids = server.engine.generator.sids
    types = np.asarray(sids.trie.item_types)  # [n_items] type index by catalog row
    usable = [t for t in range(len(sids.entity_types)) if (types == t).sum() >= history + beam]
    if not usable:
        raise UserError(f"no entity type of the bundle has the {history + beam} items a request of --history "
                        f"{history} and --beam {beam} needs")
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(1000):
        t = int(rng.choice(usable))
        rows = rng.choice(np.flatnonzero(types == t), size=history, replace=False)
        bodies.append({"history": [sids.item_ids[r] for r in rows.tolist()], "type": sids.entity_types[t].name,
                       "beam": beam, "exclude_history": True})
    return bodies


def _invalid(body: dict, answer: dict, type_of: dict[str, str]) -> int:
    """Answered items that are no catalog item of the asked type, or are in the history."""
    return sum(type_of.get(item["id"]) != body["type"] or item["id"] in body["history"] for item in answer["items"])


async def _phase(url: str, bodies: list[dict], clients: int, seconds: float, type_of: dict[str, str]) -> dict:
    """`clients` clients sending requests back to back for `seconds`."""
    latencies, errors, invalid, sent = [], 0, 0, 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        start = time.perf_counter()
        deadline = start + seconds

        async def client() -> None:
            nonlocal errors, invalid, sent
            while time.perf_counter() < deadline:
                body = bodies[sent % len(bodies)]
                sent += 1
                begin = time.perf_counter()
                try:
                    async with session.post(f"{url}/v1/recommend", json=body) as response:
                        status, answer = response.status, await response.json()
                except (aiohttp.ClientError, ValueError):  # no answer, or not JSON
                    status = None
                latencies.append(time.perf_counter() - begin)
                if status != 200:
                    errors += 1
                else:
                    invalid += _invalid(body, answer, type_of)

        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000  # [requests]
    return {"requests": len(latencies), "requests_per_s": round(len(latencies) / elapsed, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 2) if ms.size else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 2) if ms.size else None,
            "errors": errors, "invalid_items": invalid}


def _measured(server: Server, url: str, bodies: list[dict], clients: int, seconds: float,
              type_of: dict[str, str]) -> dict:
    calls, queries = server.metrics.batches()
    result = asyncio.run(_phase(url, bodies, clients, seconds, type_of))
    calls_after, queries_after = server.metrics.batches()
    result["mean_batch_size"] = round((queries_after - queries) / max(1, calls_after - calls), 3)
    return result


def run(args: argparse.Namespace) -> int:
    if args.clients < 1 or args.seconds <= 0 or args.history < 1:
        raise UserError("--clients and --history must be at least 1, --seconds positive")
    plan = plan_from_arguments(args)
    beam = plan.beam_widths[0] if args.beam is None else args.beam
    if beam not in plan.beam_widths:
        raise UserError(f"--beam {beam} is not one of --beams {list(plan.beam_widths)}")
    server = Server(load_bundle(args.bundle, mesh_from_arguments(args), args.mesh_allow_replicated), plan, "127.0.0.1",
                    0, None, args.max_wait_ms)
    bodies = _requests(server, args.history, beam, args.seed)
    sids = server.engine.generator.sids
    type_of = {item_id: sids.entity_types[int(t)].name for item_id, t in zip(sids.item_ids, sids.trie.item_types)}
    with BackgroundServer(server) as background:
        background.wait_ready(WARMUP_TIMEOUT_S)
        concurrent = _measured(server, server.url, bodies, args.clients, args.seconds, type_of)
        sequential = _measured(server, server.url, bodies, 1, args.seconds, type_of)
        compiles_after_ready = server.metrics.compiles_after_ready()
    result = {
        "benchmark": "serve",
        "bundle": str(args.bundle),
        "clients": args.clients,
        "seconds": args.seconds,
        "max_batch": plan.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "beam": beam,
        "history": args.history,
        **server.service.warmup,
        "compiles_after_ready": compiles_after_ready,
        "concurrent": concurrent,
        "sequential": sequential,
        "throughput_ratio": round(concurrent["requests_per_s"] / max(sequential["requests_per_s"], 1e-9), 3),
        "server_invalid_items": server.metrics.invalid_items(),
    }
    print(json.dumps(result))
    return 0
