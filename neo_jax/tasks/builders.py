"""Task examples: (prompt, completion) strings that interleave text and SIDs.

Every prompt starts with a fixed header line naming the task, the target entity type
and the output format, e.g. `task: recommend | type: product | format: ids`, which the
decoder reads back (`parse_header`) to choose its masks. Items are written as SIDs
(`neo_jax.vocab.format_sid`); the SID of each catalog row comes from the SID builder's
`sids.tsv` (`load_sid_map`). Each task has several phrasings (templates) and one or more
output formats:
- `recommend`: history -> the next item (`ids`, `mixed` = SID then title, `text` = title);
- `search`: query -> a relevant item (`ids`, `mixed`);
- `sid_to_text`: SID -> the item's text; `text_to_sid`: text -> SID; `sid_to_type`: SID -> type name;
- `user_profile`: history -> a profile sentence from the phrases the history shares;
- `explain`: history -> a recommended item and the reason, a phrase it shares with a history item;
- `profile_to_user`: a user's profile text -> their SID; `user_to_profile`: a user's SID -> their profile
  text (Align3GR's behaviour level; both need user SIDs, `sids build`'s `users` section). A profile is
  `profile_text` of the user's training items and of the negative feedback they gave before them.

With `TaskConfig.user_sids`, every next-item prompt (per-prefix, window and evaluation) carries the
user's SID on a line of its own after the header (`user: [SID]...[/SID]`), which belongs to the
header: fitting a long prompt never drops it (`neo_jax.tasks.records.fit_example`).

With `TaskConfig.window` > 0, next-item examples are windows of a history instead of one prompt
per prefix: the prompt is the header alone and the completion is the window's items as SIDs back
to back, so the loss (which covers the completion) covers every item's SID span and nothing of
the header, and one causal pass supervises every item of the window (as SASRec's every-position
cross-entropy; a history of n items costs O(n) tokens, not O(n^2)). A history longer than the
window is cut into windows from its newest end backwards (`window_spans`), so every training
item is a target once an epoch. Evaluation examples then use the same layout: the header, the
newest `window - 1` history items, and the target's SID as the completion.

With `TaskConfig.avoid_repeats`, each window example also carries an avoided span: the SID of one
of its own items (seeded uniform pick), written after its last item. Training penalises that
item's codes there (from `neo-jax train`'s `unlikelihood_avoided_from_level`, at the unlikelihood
weight: `neo_jax.model.loss.avoided_unlikelihood`), which is the state a beam search reaches after
taking a history item's first codes: the history unlikelihood alone never visits it when the next
item does not share them.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import json
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from neo_jax.data.loaders import read_records
from neo_jax.data.schema import Catalog, Dataset, Queries
from neo_jax.data.splits import LeaveOneOutSplit, SequenceExample
from neo_jax.errors import UserError
from neo_jax.progress import Progress
from neo_jax.vocab import format_sid

TASKS = ("recommend", "search", "sid_to_text", "text_to_sid", "sid_to_type", "user_profile", "explain",
         "profile_to_user", "user_to_profile")
USER_TASKS = ("profile_to_user", "user_to_profile")  # need the users' SIDs
DEFAULT_TASKS = tuple(t for t in TASKS if t not in USER_TASKS)
USER_LINE = "user: "  # starts the line after the header that holds the user's SID
OUTPUT_FORMATS = ("ids", "text", "mixed")
ANY_TYPE = "any"  # the entity type field of tasks about a user rather than one type of item

# task -> {output format: sampling weight}
TASK_FORMATS: dict[str, dict[str, float]] = {
    "recommend": {"ids": 0.6, "mixed": 0.3, "text": 0.1},
    "search": {"ids": 0.7, "mixed": 0.3},
    "sid_to_text": {"text": 1.0},
    "text_to_sid": {"ids": 1.0},
    "sid_to_type": {"text": 1.0},
    "user_profile": {"text": 1.0},
    "explain": {"mixed": 1.0},
    "profile_to_user": {"ids": 1.0},
    "user_to_profile": {"text": 1.0},
}

# task -> phrasings; placeholders: {type} {history} {history_titled} {query} {sid} {text} {user}
TEMPLATES: dict[str, tuple[str, ...]] = {
    "recommend": (
        "The user interacted with these items, oldest first: {history}. Recommend the next {type}.",
        "History: {history}\nWhich {type} will this user choose next?",
        "A user enjoyed {history_titled}. Suggest one {type} they are likely to pick next.",
    ),
    "search": (
        "Find a {type} for the query: {query}",
        "Search query: \"{query}\". Return a matching {type}.",
        "A user searches for {query}. Which {type} answers the search?",
    ),
    "sid_to_text": (
        "Describe the item {sid}.",
        "What is {sid}?",
        "Give the catalog text of {sid}.",
    ),
    "text_to_sid": (
        "Which {type} is this: {text}",
        "Find the {type} described as: {text}",
        "Give the ID of the {type} with this description: {text}",
    ),
    "sid_to_type": (
        "What kind of entity is {sid}?",
        "Name the entity type of {sid}.",
        "{sid} is an item of which type?",
    ),
    "user_profile": (
        "Describe the interests of a user whose history is {history}.",
        "History: {history}\nSummarise what this user likes.",
        "A user enjoyed {history_titled}. Write a short profile of this user.",
    ),
    "explain": (
        "The user interacted with {history}. Recommend a {type} and explain why.",
        "History: {history}\nSuggest the next {type} with a reason.",
        "A user enjoyed {history_titled}. Which {type} should they see next, and why?",
    ),
    "profile_to_user": (
        "Which {type} has this profile: {text}",
        "Find the {type} described as: {text}",
        "Give the ID of the {type} whose interests are: {text}",
    ),
    "user_to_profile": (
        "Describe the interests of the user {user}.",
        "What does the user {user} like?",
        "Write a short profile of the user {user}.",
    ),
}

_HEADER_PATTERN = re.compile(r"^task: (\S+) \| type: (\S+) \| format: (\S+)\n")
_PHRASE_SEPARATORS = re.compile(r"\s*(?:[;,|>]|\s-\s)\s*")


# -- the prompt schema ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PromptHeader:
    task: str
    entity_type: str
    output_format: str

    def __post_init__(self):
        if self.task not in TASKS:
            raise UserError(f"unknown task {self.task!r}; tasks are {list(TASKS)}")
        if self.output_format not in OUTPUT_FORMATS:
            raise UserError(f"unknown output format {self.output_format!r}; formats are {list(OUTPUT_FORMATS)}")

    def render(self) -> str:
        return f"task: {self.task} | type: {self.entity_type} | format: {self.output_format}\n"


def parse_header(prompt: str) -> PromptHeader:
    """The header of a prompt (its first line), as the decoder reads it."""
    match = _HEADER_PATTERN.match(prompt)
    if match is None:
        raise UserError(f"prompt does not start with a header line "
                        f"'task: TASK | type: TYPE | format: FORMAT': {prompt[:80]!r}")
    return PromptHeader(*match.groups())


@dataclasses.dataclass(frozen=True)
class TaskExample:
    task: str
    entity_type: str
    output_format: str
    prompt: str  # begins with the header line
    completion: str
    history: tuple[str, ...] = ()  # evaluation examples: the user's whole history (item ids, oldest first)
    avoid: str = ""  # training windows: a history item's SID, written after the completion, to be made unlikely

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        for optional in ("history", "avoid"):
            if not record[optional]:
                del record[optional]
        return record


def write_examples(path: str | Path, examples: Iterable[TaskExample]) -> int:
    """One JSON line an example; returns the count."""
    count = 0
    with Path(path).open("wb") as f:
        for count, example in enumerate(examples, start=1):
            f.write(_json_line(example))
    return count


def _json_line(example: TaskExample) -> bytes:
    return (json.dumps(example.to_dict(), ensure_ascii=False) + "\n").encode("utf-8")


def iter_examples(path: str | Path) -> Iterator[TaskExample]:
    """The examples of a `.jsonl` file written by `write_examples`, read one line at a time."""
    fields = [f.name for f in dataclasses.fields(TaskExample) if f.name not in ("history", "avoid")]
    for line_number, record in read_records(path):
        missing = [f for f in fields if not isinstance(record.get(f), str)]
        if missing:
            raise UserError(f"{path}:{line_number}: missing or non-string field(s) {missing}")
        history = record.get("history", [])
        if not isinstance(history, list) or not all(isinstance(item, str) for item in history):
            raise UserError(f"{path}:{line_number}: 'history' must be a list of item ids")
        avoid = record.get("avoid", "")
        if not isinstance(avoid, str):
            raise UserError(f"{path}:{line_number}: 'avoid' must be a string (an item's SID)")
        yield TaskExample(**{f: record[f] for f in fields}, history=tuple(history), avoid=avoid)


def read_examples(path: str | Path) -> list[TaskExample]:
    return list(iter_examples(path))


# -- SIDs per item ----------------------------------------------------------------------------

SidMap = dict[int, tuple[str, tuple[int, ...]]]  # catalog row -> (entity type, codes)


def load_sid_map(path: str | Path, catalog: Catalog) -> SidMap:
    """Read `sids.tsv` (`item_id`, `entity_type`, `level_0`, `level_1`, ...; a type with fewer
    levels leaves its last cells empty or -1). Every catalog item must have exactly one SID; rows of
    an entity type the catalog does not have (the users of `sids build`'s `users` section) are skipped."""
    path = Path(path)
    sid_map: SidMap = {}
    for line_number, record in read_records(path):
        missing = [c for c in ("item_id", "entity_type", "level_0") if c not in record]
        if missing:
            raise UserError(f"{path}:{line_number}: missing column(s) {missing}")
        if record["entity_type"] not in catalog.type_names:
            continue
        row = catalog.row_of.get(record["item_id"])
        if row is None:
            raise UserError(f"{path}:{line_number}: unknown item id {record['item_id']!r} (not in the catalog)")
        if row in sid_map:
            raise UserError(f"{path}:{line_number}: item {record['item_id']!r} has a second SID")
        if record["entity_type"] != catalog.type_name(row):
            raise UserError(f"{path}:{line_number}: item {record['item_id']!r} has entity type "
                            f"{record['entity_type']!r} here but {catalog.type_name(row)!r} in the catalog")
        cells = [str(record[f"level_{k}"]).strip() for k in range(len(record)) if f"level_{k}" in record]
        cells = [c for c in cells if c not in ("", "-1")]
        if not all(c.isdigit() for c in cells):
            raise UserError(f"{path}:{line_number}: SID codes must be non-negative integers, got {cells}")
        sid_map[row] = (record["entity_type"], tuple(int(c) for c in cells))
    if len(sid_map) != len(catalog):
        missing_row = next(r for r in range(len(catalog)) if r not in sid_map)
        raise UserError(f"{path}: no SID for {len(catalog) - len(sid_map)} catalog item(s), "
                        f"e.g. {catalog.item_ids[missing_row]!r}")
    return sid_map


@dataclasses.dataclass(frozen=True)
class UserSids:
    """The users' SIDs of a `sids build` with its `users` section."""

    entity_type: str
    sids: list[str]  # by user index (`Interactions.user_ids`), written with `format_sid`


def load_user_sids(path: str | Path, catalog: Catalog, user_ids: list[str]) -> UserSids | None:
    """The rows of `sids.tsv` of the one entity type the catalog does not have (the users'), or None
    when it has none; each of `user_ids` must have exactly one."""
    path, sids, type_names = Path(path), {}, set()
    for line_number, record in read_records(path):
        if record.get("entity_type") in catalog.type_names or "item_id" not in record:
            continue
        type_names.add(record["entity_type"])
        cells = [str(record[f"level_{k}"]).strip() for k in range(len(record)) if f"level_{k}" in record]
        sids[record["item_id"]] = format_sid(record["entity_type"], [int(c) for c in cells if c not in ("", "-1")])
    if not sids:
        return None
    if len(type_names) > 1:
        raise UserError(f"{path}: rows of several entity types the catalog lacks ({sorted(type_names)}); "
                        "expected the users' alone")
    missing = [u for u in user_ids if u not in sids]
    if missing:
        raise UserError(f"{path}: no SID for {len(missing)} user(s) of the interactions, e.g. {missing[0]!r}; "
                        "build the SIDs from the same data")
    return UserSids(type_names.pop(), [sids[u] for u in user_ids])


# -- building examples ------------------------------------------------------------------------

WINDOW_SAMPLING = ("tile", "random")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    tasks: tuple[str, ...] = DEFAULT_TASKS
    max_history: int = 20  # most recent items shown in a prompt
    max_search_targets: int = 5  # examples per query (one per relevant item)
    explain_fraction: float = 0.2  # share of training sequence examples also written as explanations
    window: int = 0  # > 0: next-item examples are windows of this many items (0: one prompt per prefix)
    window_sampling: str = "tile"  # tile: windows cover each history; random: as many, at random end points
    avoid_repeats: bool = False  # each window also carries one of its items as an avoided span
    user_sids: bool = False  # next-item prompts carry the user's SID after the header
    # With user_sids: the share of training next-item prompts that name their user (a seeded draw per
    # prompt); evaluation prompts always do. Below 1, the prompt's items must carry the ranking alone
    # in the rest, so a model cannot rank by recalling the user's training items from the SID alone.
    user_sid_share: float = 1.0
    seed: int = 0

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise UserError(f"unknown task(s) {unknown}; tasks are {list(TASKS)}")
        if self.max_history < 1 or self.max_search_targets < 1 or not 0.0 <= self.explain_fraction <= 1.0:
            raise UserError("max_history and max_search_targets must be positive, explain_fraction in [0, 1]")
        if self.window == 1 or self.window < 0:
            raise UserError(f"window must be 0 (one prompt per prefix) or at least 2 items, got {self.window}")
        if self.window_sampling not in WINDOW_SAMPLING:
            raise UserError(f"unknown window sampling {self.window_sampling!r}; choose one of {list(WINDOW_SAMPLING)}")
        if self.avoid_repeats and not self.window:
            raise UserError("avoid_repeats needs window examples (window >= 2): the avoided span follows a window")
        if not 0.0 < self.user_sid_share <= 1.0:
            raise UserError(f"user_sid_share must be in (0, 1], got {self.user_sid_share}")
        if self.user_sid_share < 1.0 and not self.user_sids:
            raise UserError("user_sid_share below 1 thins out the user's line: it needs user_sids")


def render_prompt(task: str, entity_type: str, output_format: str, template: int, user_line: str = "",
                  **fields: str) -> str:
    """A prompt: the header line (and `user_line`), then template `template` of `task` filled with `fields`."""
    header = PromptHeader(task, entity_type, output_format)
    return header.render() + user_line + TEMPLATES[task][template].format(type=entity_type, **fields)


class TaskBuilder:
    """Renders task examples for one catalog and its SIDs; `rng` picks templates and formats."""

    def __init__(self, catalog: Catalog, sid_map: SidMap, config: TaskConfig, rng: np.random.Generator,
                 users: UserSids | None = None):
        if users is None and (config.user_sids or set(config.tasks) & set(USER_TASKS)):
            raise UserError("user_sids and the tasks " + ", ".join(USER_TASKS) + " need the users' SIDs (build "
                            "them with `neo-jax sids build users.enabled=true`)")
        self.catalog, self.config, self.rng, self.users = catalog, config, rng, users
        # Items are rendered when an example needs them, so a builder over a catalog of millions costs
        # nothing up front; `sid_map` may be any mapping from row to (type, codes).
        self._sid_map = sid_map
        self._phrases: dict[int, frozenset[str]] = {}  # row -> its phrases, for the rows asked so far
        # task -> (output formats, cumulative sampling probabilities)
        self._format_draw = {task: (list(formats), np.cumsum(list(formats.values())) / sum(formats.values()))
                             for task, formats in TASK_FORMATS.items()}

    # items as text
    def sid(self, row: int) -> str:
        return format_sid(*self._sid_map[int(row)])

    def _title(self, row: int) -> str:
        return self.catalog.title(int(row))

    def _user_line(self, user: int | None) -> str:
        """The line after the header naming the user, with `config.user_sids` (in a seeded share
        `config.user_sid_share` of the prompts); else nothing."""
        if not self.config.user_sids:
            return ""
        if user is None:
            raise UserError("user_sids: a next-item example was built without its user")
        if self.config.user_sid_share < 1.0 and self.rng.random() >= self.config.user_sid_share:
            return ""
        return f"{USER_LINE}{self.users.sids[user]}\n"

    def _answer(self, row: int, output_format: str) -> str:
        return {"ids": self.sid(row), "mixed": f"{self.sid(row)} {self._title(row)}",
                "text": self._title(row)}[output_format]

    def _item_phrases(self, row: int) -> frozenset[str]:
        """Short lower-case phrases of an item's text fields (categories, brand, ...), split at separators."""
        row = int(row)
        if row not in self._phrases:
            self._phrases[row] = frozenset(p.lower().strip(" .") for values in self.catalog.texts.values()
                                           for p in _PHRASE_SEPARATORS.split(values[row]) if 0 < len(p.split()) <= 3)
        return self._phrases[row]

    # one example
    def _make(self, task: str, entity_type: str, fields: dict[str, str], answer: Callable[[str], str],
              output_format: str | None = None, template: int | None = None, user_line: str = "") -> TaskExample:
        """An example whose completion is `answer(output_format)`; format and template are seeded
        random picks unless given; `user_line` follows the header."""
        if output_format is None:
            formats, cumulative = self._format_draw[task]
            output_format = formats[min(int(np.searchsorted(cumulative, self.rng.random(), side="right")),
                                        len(formats) - 1)]
        if template is None:
            template = int(self.rng.random() * len(TEMPLATES[task]))
        return TaskExample(task, entity_type, output_format,
                           render_prompt(task, entity_type, output_format, template, user_line, **fields),
                           answer(output_format))

    def history_fields(self, history: np.ndarray) -> dict[str, str]:
        """The `{history}` and `{history_titled}` fields of the most recent `max_history` items."""
        recent = history[-self.config.max_history:].tolist()
        return {"history": ", ".join([self.sid(r) for r in recent]),
                "history_titled": "; ".join([f"{self.sid(r)} {self._title(r)}" for r in recent])}

    # the tasks
    def recommend(self, history: np.ndarray, target: int, output_format: str | None = None,
                  template: int | None = None, user: int | None = None) -> TaskExample:
        return self._make("recommend", self.catalog.type_name(target), self.history_fields(history),
                          lambda fmt: self._answer(target, fmt), output_format, template, self._user_line(user))

    def window(self, rows: np.ndarray, user: int | None = None) -> TaskExample:
        """A window example: the header (and the user's line), then every item of `rows` as SIDs;
        the header names the items' type when they share one, else `any`. With `avoid_repeats`, one
        of `rows` (a seeded uniform pick) is the avoided span."""
        types = {self.catalog.type_name(int(r)) for r in rows.tolist()}
        header = PromptHeader("recommend", types.pop() if len(types) == 1 else ANY_TYPE, "ids")
        avoid = self.sid(rows[self.rng.integers(len(rows))]) if self.config.avoid_repeats else ""
        return TaskExample("recommend", header.entity_type, "ids", header.render() + self._user_line(user),
                           "".join(self.sid(r) for r in rows.tolist()), avoid=avoid)

    def window_eval(self, history: np.ndarray, target: int, user: int | None = None) -> TaskExample:
        """An evaluation example in the window layout: the header naming the asked type (the
        target's) and the user's line, the newest `window - 1` history items, the target's SID as the
        completion."""
        header = PromptHeader("recommend", self.catalog.type_name(target), "ids")
        recent = history[-(self.config.window - 1):].tolist()
        return TaskExample("recommend", header.entity_type, "ids",
                           header.render() + self._user_line(user) + "".join(self.sid(r) for r in recent),
                           self.sid(target))

    def search(self, query: str, target: int) -> TaskExample:
        return self._make("search", self.catalog.type_name(target), {"query": query},
                          lambda fmt: self._answer(target, fmt))

    def sid_to_text(self, row: int) -> TaskExample:
        return self._make("sid_to_text", self.catalog.type_name(row), {"sid": self.sid(row)},
                          lambda _: self.catalog.item_text(row))

    def text_to_sid(self, row: int) -> TaskExample:
        return self._make("text_to_sid", self.catalog.type_name(row), {"text": self.catalog.item_text(row)},
                          lambda _: self.sid(row))

    def sid_to_type(self, row: int) -> TaskExample:
        return self._make("sid_to_type", self.catalog.type_name(row), {"sid": self.sid(row)},
                          lambda _: self.catalog.type_name(row))

    def user_profile(self, history: np.ndarray, disliked: np.ndarray) -> TaskExample:
        return self._make("user_profile", ANY_TYPE, self.history_fields(history),
                          lambda _: self.profile_text(history[-self.config.max_history:], disliked))

    def profile_to_user(self, user: int, history: np.ndarray, disliked: np.ndarray) -> TaskExample:
        profile = self.profile_text(history[-self.config.max_history:], disliked)
        return self._make("profile_to_user", self.users.entity_type, {"text": profile}, lambda _: self.users.sids[user])

    def user_to_profile(self, user: int, history: np.ndarray, disliked: np.ndarray) -> TaskExample:
        return self._make("user_to_profile", self.users.entity_type, {"user": self.users.sids[user]},
                          lambda _: self.profile_text(history[-self.config.max_history:], disliked))


    def explain(self, history: np.ndarray, target: int) -> TaskExample | None:
        """The target, with the most recent history item sharing a phrase with it as the reason;
        None if no history item shares one."""
        recent = history[-self.config.max_history:]
        for row in recent[::-1]:
            shared = sorted(self._item_phrases(row) & self._item_phrases(target))
            if shared:
                return self._make("explain", self.catalog.type_name(target), self.history_fields(recent),
                                  lambda fmt: f"{self._answer(target, fmt)}, because the user liked "
                                              f"{self._answer(int(row), fmt)}, which also relates to {shared[0]}.")
        return None

    def profile_text(self, history: np.ndarray, disliked: np.ndarray) -> str:
        """Phrases shared by at least two history items (at most five, most common first), then
        phrases of disliked items."""
        liked = self._shared_phrases(history, min_count=2) or sorted(self._item_phrases(history[-1]))[:3]
        text = f"This user is interested in {', '.join(liked)}."
        avoided = [p for p in self._shared_phrases(disliked, min_count=1) if p not in liked][:3]
        return text + (f" They dislike {', '.join(avoided)}." if avoided else "")

    def _shared_phrases(self, rows: np.ndarray, min_count: int, limit: int = 5) -> list[str]:
        counts = collections.Counter(p for r in np.asarray(rows).tolist() for p in self._item_phrases(r))
        return [p for p, c in sorted(counts.items(), key=lambda pc: (-pc[1], pc[0])) if c >= min_count][:limit]


def window_spans(length: int, window: int) -> list[tuple[int, int]]:
    """`[(start, end)]` half-open spans covering `range(length)`, each at most `window` long, cut
    from the newest end backwards (the oldest may be shorter), oldest first."""
    if window < 1:
        raise UserError(f"window must be at least 1 item, got {window}")
    return [(max(0, end - window), end) for end in range(length, 0, -window)][::-1]


def random_window_spans(length: int, window: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """As many spans as `window_spans` gives, each ending at a uniform random point of
    `[2, length]` (a history of one item: that item), at most `window` long, oldest first.
    Items near the newest end are targets more often than with tiling, the oldest less."""
    count = len(window_spans(length, window))
    ends = np.sort(rng.integers(min(2, length), length + 1, size=count))  # [count]
    return [(max(0, int(end) - window), int(end)) for end in ends]


def build_train_examples(dataset: Dataset, split: LeaveOneOutSplit, sid_map: SidMap, config: TaskConfig,
                         queries: Queries | None = None, users: UserSids | None = None) -> list[TaskExample]:
    """Training examples of every task in `config.tasks`, in a seeded random order, in memory (what
    `write_train_examples` writes in bounded memory).

    Sequence tasks use only `split.train` and `split.train_sequences`; the profile tasks use only
    the negative feedback given before each user's first held-out item (`negatives_before`);
    item tasks cover the whole catalog; search uses `queries` (the training share of the
    dataset's queries); `users` (their SIDs) serve `config.user_sids` and the user tasks.
    """
    rng = np.random.default_rng(config.seed)
    examples = list(_train_examples_by_task(dataset, split, sid_map, config, queries, users, rng))
    return [examples[i] for i in rng.permutation(len(examples))]


def write_train_examples(path: str | Path, dataset: Dataset, split: LeaveOneOutSplit, sid_map: SidMap,
                         config: TaskConfig, queries: Queries | None = None, users: UserSids | None = None
                         ) -> collections.Counter:
    """Write `build_train_examples`' examples, the same lines in the same order, holding one example at a
    time: each is appended to a scratch file beside `path` as it is made, and the seeded order then reads
    the lines back by byte offset (8 bytes of memory an example, not the example). Progress on stderr;
    returns the count of each task."""
    path = Path(path)
    made = Progress(None, label="train examples", unit="example")
    rng = np.random.default_rng(config.seed)
    counts: collections.Counter = collections.Counter()
    offsets = array.array("q", [0])  # int64 byte offsets of the lines, then the end
    scratch = path.with_name(path.name + ".by_task")
    try:
        with scratch.open("wb") as f:
            for example in _train_examples_by_task(dataset, split, sid_map, config, queries, users, rng):
                counts[example.task] += 1
                offsets.append(offsets[-1] + f.write(_json_line(example)))
                made.update(len(offsets) - 1)
        made.update(len(offsets) - 1, force=True)
        made.close()
        starts = np.frombuffer(offsets, np.int64)  # [examples + 1]
        with scratch.open("rb") as source, path.open("wb") as out:
            for i in rng.permutation(starts.size - 1):
                source.seek(starts[i])
                out.write(source.read(starts[i + 1] - starts[i]))
    finally:
        scratch.unlink(missing_ok=True)
    return counts


def _train_examples_by_task(dataset: Dataset, split: LeaveOneOutSplit, sid_map: SidMap, config: TaskConfig,
                            queries: Queries | None, users: UserSids | None,
                            rng: np.random.Generator) -> Iterator[TaskExample]:
    """`build_train_examples`' examples one at a time, task after task, drawing from `rng` in a fixed order."""
    builder = TaskBuilder(dataset.catalog, sid_map, config, rng, users)
    tasks = set(config.tasks)
    if "recommend" in tasks and config.window:
        spans = ((lambda n: window_spans(n, config.window)) if config.window_sampling == "tile"
                 else (lambda n: random_window_spans(n, config.window, rng)))
        for user, seq in enumerate(split.train_sequences):
            yield from (builder.window(seq[start:end], user) for start, end in spans(len(seq)))
    elif "recommend" in tasks:
        yield from (builder.recommend(e.history, e.target, user=e.user) for e in split.train)
    if "explain" in tasks:
        chosen = rng.random(len(split.train)) < config.explain_fraction
        explained = (builder.explain(e.history, e.target) for e, keep in zip(split.train, chosen) if keep)
        yield from (e for e in explained if e is not None)
    if "search" in tasks and queries is not None:
        for text, relevant in zip(queries.texts, queries.relevant):
            targets = rng.permutation(relevant)[: config.max_search_targets]
            yield from (builder.search(text, int(t)) for t in targets)
    for task in ("sid_to_text", "text_to_sid", "sid_to_type"):
        if task in tasks:
            yield from (getattr(builder, task)(row) for row in range(len(dataset.catalog)))
    if tasks & {"user_profile", *USER_TASKS}:
        # Only negative feedback from before the user's first held-out (validation) item: later
        # feedback would tell training about the time the evaluation asks to predict.
        negatives = dataset.interactions.negatives_before([len(seq) for seq in split.train_sequences])
        if "user_profile" in tasks:
            yield from (builder.user_profile(seq, negatives[user])
                        for user, seq in enumerate(split.train_sequences) if len(seq) >= 2)
        for task in USER_TASKS:
            if task in tasks:
                yield from (getattr(builder, task)(user, seq, negatives[user])
                            for user, seq in enumerate(split.train_sequences) if len(seq) >= 1)


def build_eval_examples(dataset: Dataset, examples: list[SequenceExample], sid_map: SidMap,
                        config: TaskConfig, users: UserSids | None = None) -> list[TaskExample]:
    """Next-item examples for validation or test: the window layout with `config.window`, else the
    first template; format `ids`. Each keeps the user's whole history, so an evaluation can leave
    it out of the ranking."""
    return list(iter_eval_examples(dataset, examples, sid_map, config, users))


def iter_eval_examples(dataset: Dataset, examples: Iterable[SequenceExample], sid_map: SidMap,
                       config: TaskConfig, users: UserSids | None = None) -> Iterator[TaskExample]:
    """`build_eval_examples`, one example at a time."""
    builder = TaskBuilder(dataset.catalog, sid_map,  # every evaluation prompt names its user
                          dataclasses.replace(config, tasks=("recommend",), user_sid_share=1.0),
                          np.random.default_rng(config.seed), users)
    item_ids = dataset.catalog.item_ids
    for e in examples:
        example = (builder.window_eval(e.history, e.target, e.user) if config.window
                   else builder.recommend(e.history, e.target, output_format="ids", template=0, user=e.user))
        yield dataclasses.replace(example, history=tuple(item_ids[row] for row in e.history.tolist()))
