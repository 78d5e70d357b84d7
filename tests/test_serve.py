"""`neo-jax serve`: the real server on a free local port, spoken to over HTTP.

One server (a small bundle of a random model, a bearer token) serves every test: it says ready
only after its warm-up, batches concurrent requests together, answers only real catalog items
of the asked type, refuses each malformed request with its 4xx and one JSON reason, and serves
on after every refusal and failure, with no compile after the warm-up.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

import test_export_bundle
from neo_jax.eval.language import item_sid
from neo_jax.export.bundle import load_bundle
from neo_jax.serve.engine import ShapePlan
from neo_jax.serve.server import BackgroundServer, Server
from neo_jax.vocab import format_sid

exported = test_export_bundle.run  # the fixture: a training run's final/, its bundle, the catalog, the mesh

TOKEN = "test-token-0123"
PLAN = ShapePlan(max_batch=4, beam_widths=(3,), max_prompt_tokens=128, text_tokens=16)


def call(url: str, path: str, body=None, *, raw: bytes | None = None, token: str | None = TOKEN,
         method: str | None = None) -> tuple[int, object]:
    """`(status, parsed JSON answer, or its text)` of one HTTP request."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method or ("GET" if data is None else "POST"),
                                     headers={"Content-Type": "application/json"})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode()


def metrics(url: str) -> dict[str, float]:
    """`{sample name and labels: value}` of `/metrics`."""
    status, text = call(url, "/metrics")
    assert status == 200
    return {name + json.dumps(labels, sort_keys=True) if labels else name: value
            for family in text_string_to_metric_families(text) for name, labels, value, *_ in family.samples}


@pytest.fixture(scope="module")
def served(exported):
    """`(server, catalog, what /healthz, /readyz and /v1/recommend answered during the warm-up)`."""
    root, catalog, mesh = exported
    server = Server(load_bundle(root / "bundle", mesh), PLAN, token=TOKEN, max_wait_ms=50)
    gate, warm_up = threading.Event(), server.engine.warm_up

    def gated_warm_up() -> int:  # held until the answers before readiness are in
        gate.wait(600)
        return warm_up()

    server.engine.warm_up = gated_warm_up
    with BackgroundServer(server) as background:
        product = catalog.type_names[0]
        history = [catalog.item_ids[r] for r in catalog.rows_of_type(product)[:2]]
        before = {path: call(server.url, path, token=None) for path in ("/healthz", "/readyz")}
        before["/v1/recommend"] = call(server.url, "/v1/recommend", {"history": history})
        gate.set()
        background.wait_ready(900)
        yield server, catalog, before


def history_of(catalog, type_name: str, start: int, size: int = 2) -> list[str]:
    return [catalog.item_ids[r] for r in catalog.rows_of_type(type_name)[start:start + size]]


def assert_valid(answer: dict, catalog, type_name: str, excluded=(), allowed=None) -> None:
    """Every answered item is a real catalog item of `type_name`, not excluded, in `allowed` if given."""
    assert len(answer["items"]) == answer["beam"] == len(answer["beams"])
    for item in answer["items"]:
        row = catalog.row_of[item["id"]]
        assert catalog.type_name(row) == type_name and item["type"] == type_name
        assert item["title"] == catalog.title(row) and isinstance(item["score"], float)
        assert item["id"] not in excluded and (allowed is None or item["id"] in allowed)


def test_ready_only_after_the_warm_up(served):
    server, _, before = served
    assert before["/healthz"] == (200, {"status": "ok"})
    assert before["/readyz"][0] == 503 and "warming up" in before["/readyz"][1]["error"]
    assert before["/v1/recommend"][0] == 503 and "not ready" in before["/v1/recommend"][1]["error"]
    status, ready = call(server.url, "/readyz", token=None)
    widths, batches = len(PLAN.widths), len(PLAN.batch_sizes)
    assert status == 200 and ready["ready"] and ready["shapes"] == 2 * widths * len(PLAN.beam_widths) * (batches + 1)
    assert server.url.startswith("http://127.0.0.1:")


def test_concurrent_requests_batch_together_and_name_only_valid_items(served):
    server, catalog, _ = served
    start = metrics(server.url)
    bodies = [{"history": history_of(catalog, name, i), "type": name, "exclude_history": True}
              for i in range(4) for name in catalog.type_names] * 2
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: call(server.url, "/v1/recommend", body), bodies))
    for body, (status, answer) in zip(bodies, answers):
        assert status == 200, answer
        assert_valid(answer, catalog, body["type"], excluded=body["history"])
        assert answer["prompt"].startswith(f"task: recommend | type: {body['type']} | format: ids\n")
    end = metrics(server.url)
    calls = end["neo_jax_serve_batch_size_count"] - start["neo_jax_serve_batch_size_count"]
    queries = end["neo_jax_serve_batch_size_sum"] - start["neo_jax_serve_batch_size_sum"]
    assert queries == len(bodies) and calls < len(bodies)  # some decode call held more than one request
    assert end['neo_jax_serve_requests_total{"endpoint": "recommend", "status": "200"}'] >= len(bodies)
    assert end["neo_jax_serve_invalid_items_total"] == 0
    assert end["neo_jax_serve_compiles_after_ready"] == 0


def test_generate_and_search_answer_items_and_text(served):
    server, catalog, _ = served
    product, brand = catalog.type_names[0], catalog.type_names[1]
    sid = format_sid(product, (0, 1))
    status, answer = call(server.url, "/v1/generate", {
        "prompt": f"task: recommend | type: {brand} | format: ids\nHistory: {sid}\nWhich {brand} will this user "
                  "choose next?"})
    assert status == 200, answer
    assert_valid(answer, catalog, brand)
    assert answer["text"] == answer["beams"][0]["text"] and answer["text"].startswith(f"[{brand} ")

    item = history_of(catalog, product, 0, 1)[0]
    status, answer = call(server.url, "/v1/generate", {"task": "sid_to_text", "item": item})
    assert status == 200, answer
    assert answer["format"] == "text" and answer["items"] == [] and len(answer["beams"]) == 3
    assert answer["prompt"].startswith(f"task: sid_to_text | type: {product} | format: text\nDescribe the item [SID]")

    status, answer = call(server.url, "/v1/generate", {"task": "explain", "history": history_of(catalog, product, 0),
                                                      "format": "mixed"})
    assert status == 200, answer
    assert all(catalog.row_of.get(i["id"]) is not None for i in answer["items"])

    allowed = history_of(catalog, product, 5, 4)
    status, answer = call(server.url, "/v1/search", {"query": "red lipstick", "type": product, "allowed": allowed})
    assert status == 200, answer
    assert_valid(answer, catalog, product, allowed=allowed)
    assert "Find a product for the query: red lipstick" in answer["prompt"]

    history = history_of(catalog, product, 0)
    status, answer = call(server.url, "/v1/recommend", {"history": history, "type": brand, "layout": "window"})
    assert status == 200, answer
    generator = server.engine.generator
    assert answer["prompt"] == f"task: recommend | type: {brand} | format: ids\n" + "".join(
        item_sid(generator, generator.row_of_id[i]) for i in history)
    assert_valid(answer, catalog, brand)
    assert metrics(server.url)["neo_jax_serve_compiles_after_ready"] == 0


def _bad_cases(catalog) -> list[tuple[str, str, object, int, str]]:
    """`(name, endpoint, body (bytes: sent as is), status, words the reason must hold)`."""
    product = catalog.type_names[0]
    history = history_of(catalog, product, 0)
    few = history_of(catalog, product, 0, 2)
    return [
        ("bad-json", "recommend", b'{"history": [', 400, "not JSON"),
        ("not-utf8", "recommend", b'\xff\xfe', 400, "not JSON"),
        ("not-an-object", "recommend", [1, 2], 400, "JSON object"),
        ("deeply-nested", "search", b"[" * 50_000, 400, "not JSON"),
        ("unknown-field", "recommend", {"histroy": history}, 422, "did you mean 'history'"),
        ("unknown-item", "recommend", {"history": [history[0], "no-such-item"]}, 422, "no-such-item"),
        ("unknown-type", "recommend", {"history": history, "type": "planet"}, 422, "planet"),
        ("unknown-format", "search", {"query": "x", "format": "poem"}, 422, "poem"),
        ("empty-history", "recommend", {"history": []}, 422, "empty"),
        ("missing-history", "recommend", {"type": product}, 422, "history"),
        ("empty-query", "search", {"query": "   "}, 422, "empty"),
        ("over-long-query", "search", {"query": "lipstick " * 200}, 422, "at most 128"),
        ("over-long-history", "recommend", {"history": history_of(catalog, product, 0, 33)}, 422, "at most 32"),
        ("oversized-body", "search", {"query": "x" * 80_000}, 413, "larger than"),
        ("beam-not-served", "recommend", {"history": history, "beam": 5}, 422, "beam widths [3]"),
        ("beam-not-an-integer", "recommend", {"history": history, "beam": "3"}, 422, "'beam' must be"),
        ("beam-wider-than-allowed", "search", {"query": "x", "allowed": few}, 422, "larger than the 2"),
        ("allowed-empty", "search", {"query": "x", "allowed": []}, 422, "empty"),
        ("unknown-allowed-item", "search", {"query": "x", "allowed": ["nope"]}, 422, "nope"),
        ("user-id", "recommend", {"user": "u1"}, 404, "no user histories"),
        ("prompt-without-header", "generate", {"prompt": "recommend something"}, 422, "header"),
        ("prompt-with-task", "generate", {"prompt": "task: search | type: x | format: ids\n", "task": "search"},
         422, "alone"),
        ("unknown-task", "generate", {"task": "dance"}, 422, "dance"),
        ("field-the-task-does-not-use", "generate", {"task": "search", "query": "x", "item": history[0]}, 422,
         "does not use the field 'item'"),
        ("bad-sid-token", "generate", {"prompt": f"task: search | type: {product} | format: ids\n<{product}_0_999>"},
         422, "codebook"),
        ("bad-template", "search", {"query": "x", "template": 7}, 422, "templates 0..2"),
        ("text-window", "recommend", {"history": history, "format": "text", "layout": "window"}, 422, "window"),
    ]


def test_each_malformed_request_gets_its_4xx_and_the_server_serves_on(served):
    server, catalog, _ = served
    valid = {"history": history_of(catalog, catalog.type_names[0], 0)}
    for name, endpoint, body, status, words in _bad_cases(catalog):
        raw = body if isinstance(body, bytes) else None
        got, answer = call(server.url, f"/v1/{endpoint}", None if raw else body, raw=raw)
        assert got == status and isinstance(answer, dict) and words in answer["error"], (name, got, answer)
        assert call(server.url, "/v1/recommend", valid)[0] == 200, name
    assert call(server.url, "/v2/nothing", {})[0] == 404
    assert call(server.url, "/v1/recommend", method="GET")[0] == 405
    assert metrics(server.url)["neo_jax_serve_compiles_after_ready"] == 0


def test_a_failure_inside_the_decoder_is_a_500_with_its_reason(served, monkeypatch):
    server, catalog, _ = served

    def broken(*args, **kwargs):
        raise RuntimeError("the accelerator caught fire")

    body = {"history": history_of(catalog, catalog.type_names[0], 0)}
    monkeypatch.setattr(server.engine.generator, "generate", broken)
    status, answer = call(server.url, "/v1/recommend", body)
    assert status == 500 and "the accelerator caught fire" in answer["error"]
    monkeypatch.undo()
    assert call(server.url, "/v1/recommend", body)[0] == 200


def test_the_token_is_required_except_by_the_probes(served):
    server, catalog, _ = served
    body = {"history": history_of(catalog, catalog.type_names[0], 0)}
    for token in (None, "wrong"):
        status, answer = call(server.url, "/v1/recommend", body, token=token)
        assert status == 401 and "bearer token" in answer["error"]
        assert call(server.url, "/metrics", token=token)[0] == 401
    assert call(server.url, "/healthz", token=None)[0] == 200 and call(server.url, "/readyz", token=None)[0] == 200


def test_openapi_describes_every_endpoint_and_field(served):
    server, catalog, _ = served
    status, description = call(server.url, "/openapi.json")
    assert status == 200 and description["openapi"].startswith("3.")
    assert {"/v1/generate", "/v1/recommend", "/v1/search", "/healthz", "/readyz", "/metrics",
            "/openapi.json"} <= set(description["paths"])
    schema = description["paths"]["/v1/recommend"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema["additionalProperties"] is False and schema["properties"]["beam"]["enum"] == [3]
    assert set(catalog.type_names) <= set(schema["properties"]["type"]["enum"])
    assert "bearer" in description["components"]["securitySchemes"]
