"""Request bodies of the JSON endpoints -> validated `Query` objects; answers; the OpenAPI description.

Each endpoint's fields are one table (`FIELDS`) that the validation and `/openapi.json` both read:
- `POST /v1/generate`: `prompt` in the header language (`task: T | type: E | format: F` then the
  request), or `task` with the fields its template needs (`history`, `query`, `item`, `text`);
- `POST /v1/recommend`: a `history` of item ids, oldest first, rendered as the recommend task
  (`layout: window`: the header and the history's SIDs alone, as `data tasks --window` writes
  it). A bundle carries no user histories, so a `user` id is answered 404;
- `POST /v1/search`: a `query` text, rendered as the search task.
Every one takes `type`, `format`, `beam` (one of the server's widths), `exclude` and `allowed`
(item ids), and `exclude_history` where a history is given. A refusal is a `BadRequest` with its
HTTP status: 400 for a body that is not a JSON object, 404 for a user id, 422 for the rest
(unknown or mistyped fields, unknown items or types, empty or over-long input, a beam wider than
the items the request may name).
"""

from __future__ import annotations

import dataclasses
import difflib
import string
from typing import Any, Sequence

import numpy as np

from neo_jax.decode.generate import GeneratedText
from neo_jax.errors import UserError
from neo_jax.eval.language import item_sid
from neo_jax.serve.engine import MAX_EXCLUDED, Engine, Query
from neo_jax.tasks.builders import (ANY_TYPE, OUTPUT_FORMATS, TASK_FORMATS, TASKS, TEMPLATES, PromptHeader,
                                    parse_header, render_prompt)

MAX_HISTORY = MAX_EXCLUDED  # history items one request may give (all of them may be excluded)
LAYOUTS = ("template", "window")


class BadRequest(Exception):
    """A request the server refuses: its HTTP status and the reason, in words."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclasses.dataclass(frozen=True)
class Field:
    kind: str  # string, integer, boolean, or ids (a list of item id strings)
    description: str


_COMMON = {
    "type": Field("string", "entity type of the answer's items (`any`: every type)"),
    "format": Field("string", "ids (each beam names one item), text (no item) or mixed (text citing items)"),
    "beam": Field("integer", "beams, one of the server's beam widths (default: the smallest)"),
    "exclude": Field("ids", "item ids the answer must not name"),
    "allowed": Field("ids", "the only item ids the answer may name (such requests are decoded one at a time)"),
}
_HISTORY = {
    "history": Field("ids", f"item ids the user interacted with, oldest first (at most {MAX_HISTORY})"),
    "exclude_history": Field("boolean", "keep the history's items out of the answer (default false)"),
}
FIELDS: dict[str, dict[str, Field]] = {
    "generate": {
        "prompt": Field("string", "a prompt in the header language; alone, or give `task` and its fields instead"),
        "task": Field("string", "the task whose template is filled with the fields below"),
        "template": Field("integer", "which of the task's phrasings (default 0)"),
        **_HISTORY,
        "query": Field("string", "the search query (task search)"),
        "item": Field("string", "the item (or user) id the request is about (tasks sid_to_text, sid_to_type, "
                                "user_to_profile)"),
        "text": Field("string", "an item description or a user profile (tasks text_to_sid, profile_to_user)"),
        **_COMMON,
    },
    "recommend": {
        **_HISTORY,
        "user": Field("string", "a user id; this bundle carries no user histories, so it is answered 404"),
        "template": Field("integer", "which of the recommend task's phrasings (default 0)"),
        "layout": Field("string", "template (default) or window: the header and the history's SIDs alone"),
        **_COMMON,
    },
    "search": {
        "query": Field("string", "the search query"),
        "template": Field("integer", "which of the search task's phrasings (default 0)"),
        **_COMMON,
    },
}
_PLACEHOLDER_FIELDS = {"history": "history", "history_titled": "history", "query": "query", "sid": "item",
                       "user": "item", "text": "text"}  # template placeholder -> request field
_KINDS = {"string": (str,), "integer": (int,), "boolean": (bool,)}


class RequestReader:
    """Turns request bodies into `Query` objects for `engine`, refusing bad ones with `BadRequest`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        generator = engine.generator
        self.types = [t.name for t in generator.sids.entity_types]
        self._item_types = np.asarray(generator.sids.trie.item_types)  # [n_items] type index by catalog row

    def read(self, endpoint: str, body: Any) -> Query:
        if not isinstance(body, dict):
            raise BadRequest(400, "the body must be a JSON object")
        _check_fields(FIELDS[endpoint], body)
        return {"generate": self._generate, "recommend": self._recommend, "search": self._search}[endpoint](body)

    def _recommend(self, body: dict) -> Query:
        if "user" in body:
            raise BadRequest(404, f"unknown user {body['user']!r}: this bundle carries no user histories; send "
                                  "'history' (item ids, oldest first) instead")
        history = self._history(body, required=True)
        entity_type = body.get("type", self._type_of(history[-1]))
        output_format = body.get("format", "ids")
        if body.get("layout", "template") not in LAYOUTS:
            raise BadRequest(422, f"unknown layout {body['layout']!r}; layouts are {list(LAYOUTS)}")
        if body.get("layout") == "window":
            if output_format != "ids":
                raise BadRequest(422, "the window layout asks for the 'ids' format")
            prompt = PromptHeader("recommend", entity_type, "ids").render() + "".join(self._sids(history))
        else:
            prompt = self._render("recommend", entity_type, output_format, body, history=history)
        return self._query(body, prompt, entity_type, output_format, history)

    def _search(self, body: dict) -> Query:
        query = _text(body, "query")
        entity_type, output_format = body.get("type", self.types[0]), body.get("format", "ids")
        return self._query(body, self._render("search", entity_type, output_format, body, query=query),
                           entity_type, output_format, [])

    def _generate(self, body: dict) -> Query:
        if "prompt" in body:
            clashing = sorted(set(body) & {"task", "template", "query", "item", "text", "type", "format"})
            if clashing:
                raise BadRequest(422, f"give 'prompt' alone (its header names task, type and format), or 'task' "
                                      f"with its fields; not 'prompt' with {clashing}")
            prompt = _text(body, "prompt")
            try:
                header = parse_header(prompt)
            except UserError as e:
                raise BadRequest(422, str(e)) from None
            return self._query(body, prompt, header.entity_type, header.output_format, self._history(body))
        task = body.get("task")
        if task not in TASKS:
            raise BadRequest(422, f"give 'prompt', or 'task': one of {list(TASKS)}" + ("" if task is None else
                                                                                        f", not {task!r}"))
        history = self._history(body)
        default_type = (self._type_of(body["item"]) if "item" in body else self._type_of(history[-1]) if history
                        else ANY_TYPE if task == "user_profile" else self.types[0])
        entity_type = body.get("type", default_type)
        output_format = body.get("format", next(iter(TASK_FORMATS[task])))
        fields = {name: body[name] for name in ("query", "text", "item") if name in body}
        return self._query(body, self._render(task, entity_type, output_format, body, history=history, **fields),
                           entity_type, output_format, history)

    def _render(self, task: str, entity_type: str, output_format: str, body: dict, history: Sequence[str] = (),
                **given: str) -> str:
        """The prompt of `task`'s template `body["template"]` filled with the given fields, each of
        which it must use; checks the header's type and format first."""
        self._check_header(entity_type, output_format)
        templates = TEMPLATES[task]
        index = body.get("template", 0)
        if not 0 <= index < len(templates):
            raise BadRequest(422, f"task {task!r} has templates 0..{len(templates) - 1}, not {index}")
        needed = {name for _, name, _, _ in string.Formatter().parse(templates[index]) if name and name != "type"}
        given = {**given, **({"history": history} if history else {})}
        wanted = {_PLACEHOLDER_FIELDS[name] for name in needed}
        missing, unused = sorted(wanted - set(given)), sorted(set(given) - wanted)
        if missing:
            raise BadRequest(422, f"task {task!r} (template {index}) needs the field {missing[0]!r}")
        if unused:
            raise BadRequest(422, f"task {task!r} (template {index}) does not use the field {unused[0]!r}")
        values = {}
        if "history" in wanted:
            sids, titles = self._sids(history), self.engine.generator.titles or {}
            values = {"history": ", ".join(sids),
                      "history_titled": "; ".join(f"{sid} {titles.get(item) or ''}".strip()
                                                  for sid, item in zip(sids, history))}
        if "item" in wanted:
            values["sid"] = values["user"] = self._sids([given["item"]], "item")[0]
        values.update({name: _nonempty(given[name], name) for name in ("query", "text") if name in wanted})
        return render_prompt(task, entity_type, output_format, index, **{n: values[n] for n in needed})

    def _query(self, body: dict, prompt: str, entity_type: str, output_format: str, history: Sequence[str]) -> Query:
        """The query of a rendered prompt, once its beam, exclusions, allowed items and length pass."""
        self._check_header(entity_type, output_format)
        widths = self.engine.plan.beam_widths
        beam = body.get("beam", widths[0])
        if beam not in widths:
            raise BadRequest(422, f"beam {beam} is not one of this server's beam widths {list(widths)}")
        excluded = list(dict.fromkeys(body.get("exclude", []) + (list(history) if body.get("exclude_history")
                                                                  else [])))
        if len(excluded) > MAX_EXCLUDED:
            raise BadRequest(422, f"{len(excluded)} excluded items; a request may exclude at most {MAX_EXCLUDED}")
        self._rows(excluded, "excluded")
        allowed = None
        if "allowed" in body:
            if not body["allowed"]:
                raise BadRequest(422, "'allowed' is empty: the answer could name no item")
            self._rows(body["allowed"], "allowed")
            allowed = frozenset(body["allowed"])
        try:
            tokens, limit = self.engine.prompt_tokens(prompt, output_format), self.engine.plan.max_prompt_tokens
        except UserError as e:  # a malformed SID token in the prompt
            raise BadRequest(422, str(e)) from None
        if tokens > limit:
            raise BadRequest(422, f"the prompt takes {tokens} tokens; this server takes at most {limit}")
        if output_format == "ids":
            self._check_enough_items(entity_type, beam, excluded, allowed)
        return Query(prompt, entity_type, output_format, beam, tuple(excluded), allowed)

    def _check_enough_items(self, entity_type: str, beam: int, excluded: list[str],
                            allowed: frozenset[str] | None) -> None:
        """In `ids` each beam names a distinct item: refuse more beams than items the request may name."""
        nameable = (np.ones(len(self._item_types), bool) if entity_type == ANY_TYPE
                    else self._item_types == self.types.index(entity_type))  # [n_items]
        if allowed is not None:
            mask = np.zeros_like(nameable)
            mask[self._rows(sorted(allowed), "allowed")] = True
            nameable &= mask
        nameable[self._rows(excluded, "excluded")] = False
        count = int(nameable.sum())
        if beam > count:
            raise BadRequest(422, f"beam {beam} is larger than the {count} {entity_type} item(s) this request may "
                                  "name; lower the beam")

    def _check_header(self, entity_type: str, output_format: str) -> None:
        if entity_type != ANY_TYPE and entity_type not in self.types:
            raise BadRequest(422, f"unknown entity type {entity_type!r}; the catalog has {self.types} (or "
                                  f"{ANY_TYPE!r})")
        if output_format not in OUTPUT_FORMATS:
            raise BadRequest(422, f"unknown format {output_format!r}; formats are {list(OUTPUT_FORMATS)}")

    def _history(self, body: dict, required: bool = False) -> list[str]:
        history = body.get("history", [])
        if required and not history:
            raise BadRequest(422, "'history' is missing or empty: give the item ids the user interacted with")
        if len(history) > MAX_HISTORY:
            raise BadRequest(422, f"the history has {len(history)} items; a request may give at most {MAX_HISTORY}")
        self._rows(history, "history")
        return list(history)

    def _rows(self, item_ids: Sequence[str], what: str) -> list[int]:
        row_of = self.engine.generator.row_of_id
        for item_id in item_ids:
            if item_id not in row_of:
                raise BadRequest(422, f"unknown item id {item_id!r} in {what}: not in the bundle's catalog")
        return [row_of[item_id] for item_id in item_ids]

    def _type_of(self, item_id: str) -> str:
        return self.types[int(self._item_types[self._rows([item_id], "item")[0]])]

    def _sids(self, item_ids: Sequence[str], what: str = "history") -> list[str]:
        return [item_sid(self.engine.generator, row) for row in self._rows(item_ids, what)]


def _check_fields(fields: dict[str, Field], body: dict) -> None:
    for name, value in body.items():
        field = fields.get(name)
        if field is None:
            close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
            raise BadRequest(422, f"unknown field {name!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                               f"; fields are {sorted(fields)}"))
        if field.kind == "ids":
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, _KINDS[field.kind]) and not (field.kind == "integer" and isinstance(value, bool))
        if not ok:
            raise BadRequest(422, f"field {name!r} must be " + ("a list of item id strings" if field.kind == "ids"
                                                                 else f"a JSON {field.kind}"))


def _text(body: dict, name: str) -> str:
    if name not in body:
        raise BadRequest(422, f"the field {name!r} is missing")
    return _nonempty(body[name], name)


def _nonempty(value: str, name: str) -> str:
    if not value.strip():
        raise BadRequest(422, f"the field {name!r} is empty")
    return value


def answer(query: Query, beams: Sequence[GeneratedText]) -> dict:
    """The JSON answer: `items` ranked (each named item once, with the score of the best beam naming
    it), `text` (the best beam's), and every beam as `neo-jax generate` prints it."""
    items, seen = [], set()
    for beam in beams:
        for item in beam.items:
            if item is not None and item.item_id not in seen:
                seen.add(item.item_id)
                items.append({**item.to_dict(), "score": beam.score})
    return {"prompt": query.prompt, "type": query.entity_type, "format": query.output_format, "beam": query.beam,
            "items": items, "text": beams[0].text if beams else "", "beams": [beam.to_dict() for beam in beams]}


def openapi(reader: RequestReader, auth: bool) -> dict:
    """The OpenAPI 3.1 description of the endpoints, from `FIELDS` and the server's catalog and widths."""
    enums = {"type": reader.types + [ANY_TYPE], "format": list(OUTPUT_FORMATS),
             "beam": list(reader.engine.plan.beam_widths), "task": list(TASKS), "layout": list(LAYOUTS)}

    def prop(name: str, field: Field) -> dict:
        schema = ({"type": "array", "items": {"type": "string"}} if field.kind == "ids" else {"type": field.kind})
        return {**schema, "description": field.description, **({"enum": enums[name]} if name in enums else {})}

    error = {"$ref": "#/components/schemas/Error"}
    refusals = {"400": "the body is not a JSON object", "401": "no valid bearer token", "404": "unknown user",
                "413": "the body is too large", "422": "invalid fields (the reason says which)",
                "500": "the server failed on this request", "503": "warming up"}
    paths = {}
    for endpoint, fields in FIELDS.items():
        paths[f"/v1/{endpoint}"] = {"post": {
            "summary": {"generate": "decode a prompt of the header language", "search": "items for a query text",
                        "recommend": "the next items for a history"}[endpoint],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False,
                "properties": {name: prop(name, field) for name, field in fields.items()}}}}},
            "responses": {"200": {"description": "ranked items and text",
                                  "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Answer"}}}},
                          **{code: {"description": text, "content": {"application/json": {"schema": error}}}
                             for code, text in refusals.items()}},
            **({"security": [{"bearer": []}]} if auth else {})}}
    plain = {"/healthz": "200 while the process serves", "/readyz": "200 once warm, 503 before",
             "/metrics": "Prometheus text format", "/openapi.json": "this document"}
    for path, text in plain.items():
        paths[path] = {"get": {"summary": text, "responses": {"200": {"description": text}}}}
    item = {"type": "object", "properties": {"id": {"type": "string"}, "type": {"type": "string"},
                                             "title": {"type": ["string", "null"]}, "score": {"type": "number"}}}
    components = {"schemas": {
        "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
        "Answer": {"type": "object", "properties": {
            "items": {"type": "array", "items": item}, "text": {"type": "string"}, "prompt": {"type": "string"},
            "type": {"type": "string"}, "format": {"type": "string"}, "beam": {"type": "integer"},
            "beams": {"type": "array", "items": {"type": "object"}}}}}}
    if auth:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {"openapi": "3.1.0", "info": {"title": "neo-jax serve", "version": "1"}, "paths": paths,
            "components": components}
