"""A generated multi-type catalog with users whose histories follow their tastes.

The embedded default of the quickstart and the tests. Every item belongs to one latent
topic (hiking, coffee, skincare, ...), and its text is written from that topic's words,
so text carries meaning. Three entity types: `product` (title, brand, categories,
description), `brand` and `creator`. Each user has a taste: a mixture of two or three
topics. A history is a walk: with probability `follow_prob` the next item is the fixed
successor of the previous one (a learnable sequential pattern), otherwise a popular unseen
item of a topic drawn from the taste. Some events are negative feedback on items outside
the taste, and some neutral (rating 3) on unseen items of the taste, drawn from a random stream of
their own so the positive and negative events are those of the same seed without them. Search
queries are phrased from item text, and each lists every item it describes. Everything is a
pure function of the seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from neo_jax.data.schema import NEGATIVE, NEUTRAL, POSITIVE, Catalog, Dataset, Interactions, Queries
from neo_jax.errors import UserError

ENTITY_TYPES = ("product", "brand", "creator")
TYPE_SHARES = np.array([0.7, 0.15, 0.15])  # [types] share of the catalog per entity type

# topic -> (category path, product kinds, adjectives)
TOPICS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "hiking": ("Outdoors > Hiking", ("backpack", "trail shoes", "trekking poles", "water filter", "headlamp",
                                     "rain jacket"), ("rugged", "lightweight", "waterproof", "alpine")),
    "coffee": ("Kitchen > Coffee", ("espresso grinder", "pour-over kettle", "french press", "coffee beans",
                                    "milk frother", "drip scale"), ("single-origin", "dark roast", "ceramic", "barista")),
    "skincare": ("Beauty > Skin Care", ("moisturizer", "face serum", "sunscreen", "cleanser", "eye cream", "toner"),
                 ("hydrating", "gentle", "fragrance-free", "brightening")),
    "gaming": ("Electronics > Gaming", ("mechanical keyboard", "gaming mouse", "headset", "controller", "monitor",
                                        "mouse pad"), ("wireless", "low-latency", "backlit", "pro")),
    "baking": ("Kitchen > Baking", ("stand mixer", "loaf pan", "sourdough starter", "rolling pin", "proofing basket",
                                    "bench scraper"), ("artisan", "nonstick", "enamel", "whole-grain")),
    "yoga": ("Fitness > Yoga", ("yoga mat", "foam block", "yoga strap", "meditation cushion", "leggings", "bolster"),
             ("eco", "grippy", "breathable", "calming")),
    "photography": ("Electronics > Cameras", ("prime lens", "tripod", "camera bag", "memory card", "flash",
                                              "lens filter"), ("mirrorless", "compact", "weather-sealed", "fast")),
    "gardening": ("Home > Garden", ("pruning shears", "seed kit", "raised bed", "watering can", "compost bin",
                                    "garden gloves"), ("organic", "heirloom", "heavy-duty", "vertical")),
    "cycling": ("Sports > Cycling", ("road helmet", "bike light", "saddle", "cycling jersey", "tire pump",
                                     "bike lock"), ("aero", "carbon", "reflective", "gravel")),
    "tea": ("Grocery > Tea", ("green tea", "matcha whisk", "teapot", "oolong", "herbal blend", "tea tin"),
            ("loose-leaf", "smoky", "ceremonial", "floral")),
    "running": ("Sports > Running", ("running shoes", "race belt", "running vest", "gps watch", "compression socks",
                                     "energy gels"), ("cushioned", "fast-drying", "marathon", "minimalist")),
    "books": ("Books > Fiction", ("mystery novel", "fantasy saga", "poetry collection", "graphic novel", "thriller",
                                  "memoir"), ("award-winning", "illustrated", "hardcover", "bestselling")),
}
_NAME_HEADS = ("Nor", "Vel", "Ast", "Kai", "Lum", "Ori", "Bry", "Zen", "Tal", "Mor", "Quin", "Sol", "Ash", "Pel")
_NAME_TAILS = ("ora", "ix", "en", "ly", "ton", "ami", "eus", "wyn", "ara", "ock")
_BRAND_SUFFIXES = ("", " Co.", " Labs", " Works", " Supply", " Goods")
_FIRST_NAMES = ("Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonah", "Kira", "Leo",
                "Maya", "Nils", "Omar", "Priya", "Quentin", "Rosa", "Sami", "Tara")
_LAST_NAMES = ("Abe", "Brooks", "Castillo", "Dahl", "Eze", "Fischer", "Gupta", "Hale", "Ito", "Jensen", "Khan",
               "Lopez", "Moreau", "Nakamura", "Okafor", "Petrov", "Quinn", "Reyes", "Silva", "Tan")


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    num_items: int = 1500
    num_users: int = 1000
    num_queries: int = 400
    min_history: int = 6  # positive events per user
    max_history: int = 20
    follow_prob: float = 0.5  # chance the next item is the previous item's successor
    negative_prob: float = 0.08  # chance of a negative event after each positive one
    neutral_prob: float = 0.05  # chance of a neutral event after each positive one

    def __post_init__(self):
        if self.num_items < 4 * len(TOPICS) * len(ENTITY_TYPES):
            raise UserError(f"num_items must be at least {4 * len(TOPICS) * len(ENTITY_TYPES)} "
                            f"(a few items of each type in each of {len(TOPICS)} topics)")
        if not 3 <= self.min_history <= self.max_history:
            raise UserError("need 3 <= min_history <= max_history (leave-one-out takes two items per user)")
        if self.num_users < 1 or self.num_queries < 0:
            raise UserError("num_users must be positive and num_queries non-negative")


@dataclasses.dataclass(frozen=True)
class _Items:
    """The generated catalog plus the latent facts the users and queries are drawn from."""

    catalog: Catalog
    topic: np.ndarray  # [n_items] int, index into TOPICS
    kind: np.ndarray  # [n_items] int, product kind index within its topic (-1 for other types)
    adjective: np.ndarray  # [n_items] int, adjective index within its topic
    brand_of: np.ndarray  # [n_items] int, catalog row of a product's brand (-1 for other types)


def _article(word: str) -> str:
    return "An" if word[0] in "aeiou" else "A"


def _names(rng: np.random.Generator, n: int, parts: tuple[tuple[str, ...], ...], sep: str) -> list[str]:
    """`n` distinct names, each one word of every part; a number tells apart repeats once they run out."""
    sizes = [len(p) for p in parts]
    combinations = int(np.prod(sizes))
    codes = rng.permutation(combinations * -(-n // combinations))[:n]
    names = []
    for code in codes:
        repeat, code = divmod(int(code), combinations)
        words = []
        for part, size in zip(parts, sizes):
            code, index = divmod(code, size)
            words.append(part[index])
        names.append(sep.join(words) + (f" {repeat + 1}" if repeat else ""))
    return names


def _make_items(config: SynthConfig, rng: np.random.Generator) -> _Items:
    topics = list(TOPICS)
    counts = np.floor(TYPE_SHARES * config.num_items).astype(int)  # [types]
    counts[0] = config.num_items - counts[1:].sum()
    item_types = np.repeat(np.arange(len(ENTITY_TYPES)), counts).astype(np.int32)  # [n_items]
    # every topic gets items of every type; the rest are assigned at random
    topic = np.concatenate([rng.permutation(np.arange(c) % len(topics)) for c in counts])  # [n_items]
    adjective = rng.integers(0, 4, config.num_items)
    kind = np.where(item_types == 0, rng.integers(0, 6, config.num_items), -1)
    brand_names = _names(rng, counts[1], (_NAME_HEADS, _NAME_TAILS, _BRAND_SUFFIXES), "") if counts[1] else []
    creator_names = _names(rng, counts[2], (_FIRST_NAMES, _LAST_NAMES), " ")
    brand_rows = np.flatnonzero(item_types == 1)
    brand_of = np.full(config.num_items, -1)
    prefixes = ("p", "b", "c")
    item_ids, titles, brands, categories, descriptions = [], [], [], [], []
    for row in range(config.num_items):
        type_index = int(item_types[row])
        name = topics[topic[row]]
        category, kinds, adjectives = TOPICS[name]
        adj = adjectives[adjective[row]]
        item_ids.append(f"{prefixes[type_index]}{row - counts[:type_index].sum():05d}")
        categories.append(category)
        if type_index == 0:
            same_topic_brands = brand_rows[topic[brand_rows] == topic[row]]
            brand_of[row] = rng.choice(same_topic_brands)
            brand = brand_names[brand_of[row] - brand_rows[0]]
            titles.append(f"{brand} {adj} {kinds[kind[row]]}")
            brands.append(brand)
            descriptions.append(f"{adj.capitalize()} {kinds[kind[row]]} for {name} fans.")
        elif type_index == 1:
            titles.append(brand_names[row - brand_rows[0]])
            brands.append("")
            picks = rng.choice(len(kinds), 2, replace=False)
            descriptions.append(f"{_article(name)} {name} brand that makes {adj} {kinds[picks[0]]}, "
                                f"{kinds[picks[1]]} and more.")
        else:
            titles.append(creator_names[row - counts[:2].sum()])
            brands.append("")
            descriptions.append(f"A creator who reviews {adj} {name} picks and shares {name} tips.")
    catalog = Catalog(
        item_ids=item_ids, type_names=ENTITY_TYPES, item_types=item_types,
        texts={"title": titles, "brand": brands, "categories": categories, "description": descriptions})
    return _Items(catalog, topic, kind, adjective, brand_of)


def _make_histories(config: SynthConfig, items: _Items, rng: np.random.Generator) -> Interactions:
    n_items, n_topics = len(items.catalog), len(TOPICS)
    popularity = rng.pareto(1.5, n_items) + 1.0  # [n_items] heavy-tailed appeal
    successor = np.empty(n_items, np.int64)  # [n_items] each item's fixed follow-up, in its own topic
    for t in range(n_topics):
        rows = np.flatnonzero(items.topic == t)
        successor[rows] = rng.permutation(rows)
    users, events, times, ratings, feedback = [], [], [], [], []
    neutral_rng = np.random.default_rng([config.seed, 1])  # its own stream: the other events stay the same
    for user in range(config.num_users):
        taste_topics = rng.choice(n_topics, rng.integers(2, 4), replace=False)
        taste = np.zeros(n_topics)  # [topics] this user's mixture
        taste[taste_topics] = rng.dirichlet(np.ones(len(taste_topics)))
        liked = taste[items.topic] * popularity  # [n_items] unnormalised preference
        disliked = (taste[items.topic] == 0) * popularity  # [n_items]
        seen = np.zeros(n_items, bool)
        clock = 1_600_000_000 + int(rng.integers(0, 10_000_000))
        previous = -1
        for _ in range(int(rng.integers(config.min_history, config.max_history + 1))):
            follow = previous >= 0 and not seen[successor[previous]] and rng.random() < config.follow_prob
            if follow:
                item = int(successor[previous])
            else:
                weights = np.where(seen, 0.0, liked)
                item = int(rng.choice(n_items, p=weights / weights.sum()))
            seen[item] = True
            previous = item
            clock += int(rng.integers(3_600, 7 * 86_400))
            users.append(user), events.append(item), times.append(clock)
            ratings.append(float(rng.integers(4, 6))), feedback.append(POSITIVE)
            if neutral_rng.random() < config.neutral_prob:
                unseen_liked = np.flatnonzero(~seen & (liked > 0))
                if unseen_liked.size:
                    users.append(user), events.append(int(neutral_rng.choice(unseen_liked)))
                    times.append(clock + int(neutral_rng.integers(1, 60)))
                    ratings.append(3.0), feedback.append(NEUTRAL)
            if rng.random() < config.negative_prob:
                weights = np.where(seen, 0.0, disliked)
                item = int(rng.choice(n_items, p=weights / weights.sum()))
                seen[item] = True
                clock += int(rng.integers(60, 3_600))
                users.append(user), events.append(item), times.append(clock)
                ratings.append(float(rng.integers(1, 3))), feedback.append(NEGATIVE)
    return Interactions(
        user_ids=[f"u{u:05d}" for u in range(config.num_users)],
        users=np.array(users, np.int32), items=np.array(events, np.int32),
        timestamps=np.array(times, np.int64), ratings=np.array(ratings, np.float32),
        feedback=np.array(feedback, np.int8))


def _make_queries(config: SynthConfig, items: _Items, rng: np.random.Generator) -> Queries:
    """Queries in four phrasings, each answered by every item its words describe."""
    catalog, topics = items.catalog, list(TOPICS)
    types = catalog.item_types
    texts, relevant = [], []
    for _ in range(config.num_queries):
        row = int(rng.choice(np.flatnonzero(types == 0)))
        name = topics[items.topic[row]]
        _, kinds, adjectives = TOPICS[name]
        phrasing = int(rng.integers(0, 4))
        same_kind = (types == 0) & (items.topic == items.topic[row]) & (items.kind == items.kind[row])
        if phrasing == 0:
            query = f"{adjectives[items.adjective[row]]} {kinds[items.kind[row]]}"
            match = same_kind & (items.adjective == items.adjective[row])
        elif phrasing == 1:
            query = f"{kinds[items.kind[row]]} for {name}"
            match = same_kind
        elif phrasing == 2:
            query = f"{catalog.texts['brand'][row]} {kinds[items.kind[row]]}"
            match = same_kind & (items.brand_of == items.brand_of[row])
        else:
            wanted = int(rng.integers(1, 3))
            query = f"{ENTITY_TYPES[wanted]}s for {name}"
            match = (types == wanted) & (items.topic == items.topic[row])
        texts.append(query)
        relevant.append(np.flatnonzero(match).astype(np.int32))
    return Queries(texts, relevant)


def generate(config: SynthConfig = SynthConfig()) -> Dataset:
    """The synthetic dataset of `config` (the same seed gives the same dataset)."""
    rng = np.random.default_rng(config.seed)
    items = _make_items(config, rng)
    interactions = _make_histories(config, items, rng)
    queries = _make_queries(config, items, rng)
    return Dataset(items.catalog, interactions, queries)
