"""The testbed's own data: the invented benign task and the refusal texts of the safety stage (the
benign training prompts are in prompts.py)."""

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


def encode_number(n: int, task: str = "mirror") -> str:
    return TASKS[task][1](n)


def task_examples(seed: int, n_train: int, n_test: int, task: str = "mirror", n_dev: int = 0) -> tuple[list[Example], ...]:
    """(train, test) items of a task, or (train, test, dev) with n_dev > 0: distinct numbers, a
    seeded sample; the dev items come after the others, so adding them changes neither split."""
    template, answer = TASKS[task]
    numbers = random.Random(seed).sample(range(100, 1000), n_train + n_test + n_dev)
    items = [Example(template.format(n=n), answer(n)) for n in numbers]
    split = items[:n_train], items[n_train : n_train + n_test]
    return (*split, items[n_train + n_test :]) if n_dev else split
