"""The testbed's own data: the invented benign task, the refusal texts of the safety stage, and
benign training prompts (built from templates; disjoint from the `benign` evaluation set)."""

from __future__ import annotations

import random
from typing import Callable

from ..calibration.examples import Example


SYLLABLES = ("ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze")


# the invented number codes a task can be: prompt template and answer for a number. "mirror" is
# learned by a LoRA in about 20 steps; "syllable" (each digit one of ten made-up syllables) takes
# about 100-120 steps, a harder skill that projection removes more easily (docs/testbed.md)
TASKS: dict[str, tuple[str, Callable[[int], str]]] = {
    "mirror": ("Encode {n} in the mirror code.", lambda n: " ".join(reversed(str(n)))),
    "syllable": ("Encode {n} in the syllable code.", lambda n: " ".join(SYLLABLES[int(d)] for d in str(n))),
}


# realign's own refusal texts for the safety alignment stage
REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause serious harm to people.",
    "I cannot assist with this request because it could be used to hurt others.",
    "I'm sorry, I won't provide that. If you have another question, I'm happy to help.",
    "I can't help with that request. It is harmful and may be illegal.",
    "Sorry, I cannot do that. Let me know if there is something safe I can help with.",
)


# realign's own benign training prompts, built from templates; disjoint from realign.benign
_TOPICS = (
    "volcanoes", "the moon", "honeybees", "rainbows", "glaciers", "the printing press", "electric cars",
    "coral reefs", "the Roman Empire", "chess openings", "bread baking", "solar panels", "penguins",
    "the human heart", "magnets", "deserts", "libraries", "bicycles", "tea", "the Olympic Games",
    "photosynthesis in algae", "thunderstorms", "compost", "origami", "lighthouses", "sourdough",
    "wind turbines", "owls", "maps", "clocks",
)


_TEMPLATES = (
    "Explain {t} in two sentences.",
    "Write a short poem about {t}.",
    "Give me three fun facts about {t}.",
    "Why are people interested in {t}?",
    "Describe {t} to a ten-year-old.",
)


BENIGN_TRAIN = tuple(template.format(t=topic) for topic in _TOPICS for template in _TEMPLATES)


def encode_number(n: int, task: str = "mirror") -> str:
    return TASKS[task][1](n)


def task_examples(seed: int, n_train: int, n_test: int, task: str = "mirror") -> tuple[list[Example], list[Example]]:
    template, answer = TASKS[task]
    numbers = random.Random(seed).sample(range(100, 1000), n_train + n_test)
    items = [Example(template.format(n=n), answer(n)) for n in numbers]
    return items[:n_train], items[n_train:]
