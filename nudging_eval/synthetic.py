"""Generated tasks, so the whole pipeline runs offline and small models are not stuck at 0%.

Seeded (the same seed and difficulty give the same problems) with a difficulty knob:
`arithmetic` chains `difficulty` operations, `coin_flip` has `difficulty` people who may
flip the coin, `last_letters` concatenates the last letters of `difficulty` words.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .datasets import AnswerType, Sample

NAMES = (
    "Ann",
    "Ben",
    "Cara",
    "Dan",
    "Eva",
    "Finn",
    "Gia",
    "Hugo",
    "Ivy",
    "Jack",
    "Kim",
    "Leo",
    "Mia",
    "Noah",
    "Owen",
    "Pia",
    "Ray",
    "Sara",
    "Tom",
    "Uma",
)
ITEMS = ("apples", "books", "coins", "pencils", "stickers", "marbles", "cookies", "cards")
WORDS = (
    "river",
    "candle",
    "garden",
    "window",
    "pepper",
    "silver",
    "basket",
    "rocket",
    "forest",
    "yellow",
    "planet",
    "monkey",
    "ladder",
    "butter",
    "island",
    "magnet",
    "orange",
    "tunnel",
)


def _arithmetic(rng: random.Random, difficulty: int) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(2, 9)
    sentences = [f"{name} has {total} {item}."]
    for _ in range(difficulty):
        amount = rng.randint(1, 9)
        friend = rng.choice([n for n in NAMES if n != name])
        if total > amount and rng.random() < 0.5:
            total -= amount
            sentences.append(f"{name} gives {amount} {item} to {friend}.")
        else:
            total += amount
            sentences.append(f"{friend} gives {name} {amount} more {item}.")
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), str(total)


def _coin_flip(rng: random.Random, difficulty: int) -> tuple[str, str]:
    heads = True
    sentences = ["A coin is heads up."]
    for name in rng.choices(NAMES, k=difficulty):
        if rng.random() < 0.5:
            heads = not heads
            sentences.append(f"{name} flips the coin.")
        else:
            sentences.append(f"{name} does not flip the coin.")
    sentences.append("Is the coin still heads up?")
    return " ".join(sentences), "yes" if heads else "no"


def _last_letters(rng: random.Random, difficulty: int) -> tuple[str, str]:
    words = rng.choices(WORDS, k=difficulty)
    phrase = " ".join(word.capitalize() for word in words)
    question = f'Take the last letters of each word in "{phrase}" and concatenate them.'
    return question, "".join(word[-1] for word in words)


Generator = Callable[[random.Random, int], tuple[str, str]]
SYNTHETIC: dict[str, tuple[Generator, AnswerType]] = {
    "synthetic_arithmetic": (_arithmetic, "number"),
    "synthetic_coin_flip": (_coin_flip, "coin_flip"),
    "synthetic_last_letters": (_last_letters, "last_letters"),
}
DEFAULT_COUNT = 50


def generate(name: str, count: int | None = None, difficulty: int = 2, seed: int = 0) -> list[Sample]:
    if difficulty < 1:
        raise ValueError("difficulty must be at least 1")
    make, answer_type = SYNTHETIC[name]
    # One generator per task, seeded by task, difficulty and seed: runs repeat exactly.
    rng = random.Random(f"{name}:{difficulty}:{seed}")
    samples = []
    for index in range(count or DEFAULT_COUNT):
        question, gold = make(rng, difficulty)
        samples.append(
            Sample(
                id=f"{name}-d{difficulty}-{index}",
                question=question,
                gold=gold,
                reference=gold,
                answer_type=answer_type,
            )
        )
    return samples
