"""`neo-jax serve BUNDLE`: a serving bundle behind a JSON HTTP API, with dynamic batching.

    neo-jax serve runs/tiny_instruct/bundle [--host 127.0.0.1] [--port 8000] [--token-file F]
        [--max-batch 16] [--max-wait-ms 10] [--beams 5,10] [--max-prompt-tokens 128]
    curl -s localhost:8000/v1/recommend -d '{"history": ["p1", "p7"], "beam": 5, "exclude_history": true}'

The bundle is verified (`neo-jax export`'s manifest) and loaded; the server listens, compiles
every shape it will decode with (batch sizes up to --max-batch, prompt widths up to
--max-prompt-tokens, the --beams widths; `neo_jax.serve.engine`), and then /readyz says ready.
Prints a JSON line when listening and one when ready; serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from neo_jax.errors import UserError
from neo_jax.export.bundle import load_bundle
from neo_jax.serve.app import MAX_BODY_BYTES, OPEN_PATHS
from neo_jax.serve.engine import MAX_EXCLUDED, ShapePlan
from neo_jax.serve.server import Server, check_options, run_forever
from neo_jax.sharding import add_mesh_arguments, mesh_from_arguments

_DEFAULTS = ShapePlan()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Endpoints (JSON; GET /openapi.json describes every field):\n"
        "  POST /v1/generate   {\"prompt\": \"task: ... | type: ... | format: ...\\n...\"} or {\"task\", \"type\",\n"
        "                      \"format\", \"history\" | \"query\" | \"item\" | \"text\"}\n"
        "  POST /v1/recommend  {\"history\": [item ids, oldest first]} (a bundle has no user histories:\n"
        "                      a \"user\" id is answered 404)\n"
        "  POST /v1/search     {\"query\": \"...\"}\n"
        "  each takes \"type\", \"format\", \"beam\", \"exclude\", \"allowed\" (and \"exclude_history\"); the answer\n"
        "  is {\"items\": [{\"id\", \"type\", \"title\", \"score\"}], \"text\", \"beams\", ...}.\n"
        "  GET /healthz, /readyz (200 once warm), /metrics (Prometheus), /openapi.json.\n"
        f"A refusal is a 4xx {{\"error\": reason}}: 400 bad JSON, 401 no token, 404 unknown user, 413 a body\n"
        f"over {MAX_BODY_BYTES} bytes, 422 anything else invalid. A history or exclusion list holds at most\n"
        f"{MAX_EXCLUDED} items. With --token-file, every path but {' and '.join(OPEN_PATHS)} needs\n"
        "'Authorization: Bearer <token>'.")
    parser.add_argument("bundle", help="a serving bundle directory written by `neo-jax export`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: a free one)")
    parser.add_argument("--token-file", default=None,
                        help="file holding the bearer token every request must send (default: no token)")
    add_plan_arguments(parser)
    add_mesh_arguments(parser)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The batching and compiled-shape options (`ShapePlan`), of `serve` and `bench serve`."""
    parser.add_argument("--max-batch", type=int, default=_DEFAULTS.max_batch,
                        help=f"requests decoded together at most (default {_DEFAULTS.max_batch})")
    parser.add_argument("--max-wait-ms", type=float, default=10.0,
                        help="how long the first request of a batch waits for more (default 10)")
    parser.add_argument("--beams", default=",".join(map(str, _DEFAULTS.beam_widths)),
                        help="the beam widths a request may ask for, comma-separated; each is compiled "
                             f"(default {','.join(map(str, _DEFAULTS.beam_widths))}; the first is the default)")
    parser.add_argument("--max-prompt-tokens", type=int, default=_DEFAULTS.max_prompt_tokens,
                        help=f"longest prompt accepted, in tokens (default {_DEFAULTS.max_prompt_tokens})")
    parser.add_argument("--text-tokens", type=int, default=_DEFAULTS.text_tokens,
                        help=f"new tokens of text and mixed answers (default {_DEFAULTS.text_tokens})")


def parse_widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--beams must be comma-separated integers, got {text!r}") from None


def read_token(path: str | Path) -> str:
    """The bearer token in `path` (surrounding whitespace dropped)."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the token file: {getattr(e, 'strerror', None) or e}") from None
    if not token or any(c.isspace() for c in token):
        raise UserError(f"{path}: the token file must hold one token, with no spaces")
    return token


def plan_from_arguments(args: argparse.Namespace) -> ShapePlan:
    return ShapePlan(max_batch=args.max_batch, beam_widths=parse_widths(args.beams),
                     max_prompt_tokens=args.max_prompt_tokens, text_tokens=args.text_tokens)


def run(args: argparse.Namespace) -> int:
    token = None if args.token_file is None else read_token(args.token_file)
    plan = plan_from_arguments(args)
    check_options(args.port, args.max_wait_ms)
    server = Server(load_bundle(args.bundle, mesh_from_arguments(args), args.mesh_allow_replicated), plan, args.host,
                    args.port, token, args.max_wait_ms)
    asyncio.run(run_forever(server))
    return 0
