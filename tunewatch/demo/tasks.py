"""The demo's two tasks: product attribute extraction from product titles, the task of the
LoRA fine-tuning study arXiv 2407.13906, generated from the project's own templates (no hub).

Task A asks for the brand of a title written as marketplaces list them ("Acme 40L Hiking
Backpack, Waterproof, Navy"). Task B is the shift a shop meets when a new supplier feed
arrives: titles in another format ("Hiking Backpack | Waterproof | Navy | Size 40L | by
Acme") and two other attributes asked for, as JSON. The answers are exact strings, so both
are scored by exact match and chrF (monitor/quality.py), and the base model, which knows
neither the reply format nor which part of the title is the size, starts low on both.

Every example is a function of its seed: the demo, its test and bench/loop.py draw the
same traffic, and a held-out set (another seed, excluding the traffic's titles) shares no
title with what the model was trained on.
"""

from __future__ import annotations

import json
import random
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Literal

Task = Literal["a", "b"]

BRANDS = (
    "Acme", "Northwind", "Blue Heron", "Kestrel", "Alpenglow", "Stonebridge", "Marlow",
    "Vireo", "Tidewater", "Ironbark", "Lumen", "Copperfield", "Harbor & Pine", "Quillon",
    "Redwood Supply", "Silverline", "Halcyon", "Everkind", "Brightwell", "Cobalt Co.",
    "Juniper", "Oakhurst", "Pellucid", "Summit Works", "Wrenfield", "Zephyr", "Larkspur",
    "Nordvik", "Basalt", "Fenwick", "Greyhaven", "Ostara",
)  # fmt: skip
# A product, its sizes, and the features its titles mention.
PRODUCTS = (
    ("Hiking Backpack", ("20L", "30L", "40L", "55L"), ("Waterproof", "Lightweight", "Padded")),
    ("Running Shoes", ("EU 39", "EU 41", "EU 43", "EU 45"), ("Breathable", "Cushioned")),
    ("Cotton T-Shirt", ("S", "M", "L", "XL"), ("Organic", "Slim Fit", "Crew Neck")),
    ("Rain Jacket", ("S", "M", "L", "XXL"), ("Packable", "Hooded", "Windproof")),
    ("Water Bottle", ("500ml", "750ml", "1L"), ("Insulated", "BPA-Free", "Leakproof")),
    ("Yoga Mat", ("4mm", "6mm", "8mm"), ("Non-Slip", "Eco-Friendly")),
    ("Desk Lamp", ("30cm", "45cm"), ("Dimmable", "USB-C", "LED")),
    ("Duvet Cover", ("Single", "Double", "King"), ("Linen", "Cotton Sateen")),
    ("Phone Case", ("6.1in", "6.7in"), ("Shockproof", "MagSafe", "Slim")),
    ("Wool Socks", ("S", "M", "L"), ("Merino", "Cushioned", "Ankle")),
)
COLOURS = (
    "Black", "White", "Navy", "Olive", "Red", "Grey", "Sand", "Teal", "Burgundy", "Mustard",
    "Forest Green", "Sky Blue",
)  # fmt: skip

MAX_MISSES = 10_000  # titles drawn again in a row: the templates are spent

INSTRUCTION = {
    "a": "Extract the brand from this product title. Reply with the brand only.",
    "b": "Extract the colour and size from this product title. Reply with JSON only: "
    '{"colour": "...", "size": "..."}',
}


@dataclass(frozen=True)
class Example:
    task: Task
    prompt: str
    reference: str


@dataclass(frozen=True)
class _Product:
    brand: str
    kind: str
    size: str
    features: tuple[str, ...]
    colour: str


def _product(rng: random.Random) -> _Product:
    kind, sizes, features = rng.choice(PRODUCTS)
    chosen = tuple(rng.sample(features, k=rng.randint(1, min(2, len(features)))))
    return _Product(rng.choice(BRANDS), kind, rng.choice(sizes), chosen, rng.choice(COLOURS))


def _title(task: Task, product: _Product) -> str:
    """Task A: the marketplace format; task B: the new supplier's feed."""
    if task == "a":
        features = ", ".join(product.features)
        return f"{product.brand} {product.size} {product.kind}, {features}, {product.colour}"
    parts = [product.kind, *product.features, product.colour, f"Size {product.size}"]
    return " | ".join(parts) + f" | by {product.brand}"


def _reference(task: Task, product: _Product) -> str:
    if task == "a":
        return product.brand
    return json.dumps({"colour": product.colour, "size": product.size})


def examples(
    task: Task, count: int, seed: int, excluding: Collection[Example] = ()
) -> list[Example]:
    """`count` distinct examples of a task, none with a title in `excluding` (the training
    examples, for a held-out set); the same arguments give the same list."""
    rng, out, misses = random.Random(f"{task}-{seed}"), [], 0
    seen = {e.prompt for e in excluding}
    while len(out) < count:
        product = _product(rng)
        prompt = f"{INSTRUCTION[task]}\nTitle: {_title(task, product)}"
        if prompt in seen:
            misses += 1
            if misses > MAX_MISSES:
                raise ValueError(
                    f"the templates hold fewer than {count} distinct task-{task} titles"
                )
            continue
        misses = 0
        seen.add(prompt)
        out.append(Example(task, prompt, _reference(task, product)))
    return out


def traffic(examples_: list[Example], start_s: float, rate: float) -> Iterator[dict[str, object]]:
    """Traffic lines (tunewatch/traffic.py) at `rate` a second from `start_s`, a user each."""
    for n, example in enumerate(examples_):
        yield {
            "prompt": example.prompt,
            "reference": example.reference,
            "user": f"shopper-{example.task}-{n % 97}",
            "at": round(start_s + n / rate, 3),
            "max_tokens": 24,
            "temperature": 0.0,
        }
