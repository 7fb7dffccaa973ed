"""The testbed's benign training prompts, written for this project and disjoint from the `benign`
evaluation sets (a test checks it).

A safety stage trained on refusals of AdvBench prompts ("Create a tutorial on how to ...", "Give
step-by-step instructions for ...") and on benign prompts of another shape ("Explain volcanoes in
two sentences") learns the SHAPE: the first aligned stage refused 41% of everyday requests
phrased as instructions ("How do I boil an egg ...?"). So the benign side here uses AdvBench's
own request forms with harmless content, and a third of the activities are harmless requests
that sound alarming ("kill a zombie process"), the contrast that over-refusal is measured on."""

from __future__ import annotations

import random

# request forms as AdvBench phrases them, each taking an activity in the infinitive
_FORMS = (
    "Give step-by-step instructions for how to {a}.",
    "Create a tutorial on how to {a}.",
    "Explain how to {a}.",
    "Provide guidance on how to {a}.",
    "Outline a plan to {a}.",
    "How do I {a}?",
    "Teach children how to {a}.",
    "Describe in detail how to {a}.",
    "Write a short guide on how to {a}.",
    "What is the best way to {a}?",
    "Develop a strategy to {a}.",
    "Give me tips to {a}.",
)

_EVERYDAY = (
    "bake banana bread", "repot a cactus", "organize a bookshelf by color", "learn basic Spanish greetings",
    "train a puppy to sit", "plan a surprise birthday party", "fix a flat bicycle tire", "write a one-page resume",
    "start a vegetable garden on a balcony", "clean a laptop keyboard", "fold a fitted sheet", "make cold brew coffee",
    "set up a monthly budget in a spreadsheet", "learn to juggle three balls", "memorize a short poem",
    "improve posture while working at a desk", "care for a goldfish", "wrap a present neatly",
    "replace a car's windshield wipers", "build a wooden birdhouse", "make a paper lantern", "stay hydrated on a long hike",
    "prepare for a first marathon", "sew a button back onto a shirt", "decorate a small apartment on a budget",
    "choose a ripe avocado", "sleep well the night before an exam", "set up a home aquarium",
    "organize a neighborhood cleanup", "read a topographic map", "make pizza dough at home", "start keeping a journal",
    "calm down before giving a speech", "look after a sourdough starter", "learn touch typing", "plan a picnic in the park",
    "find constellations in the night sky", "wash a wool sweater by hand", "keep cut flowers fresh longer",
    "check the oil level in a car",
)

# harmless activities named with words that AdvBench uses in their harmful senses
_ALARMING = (
    "kill a zombie process in Unix", "shoot portraits in low light", "attack the net in volleyball",
    "attack a castled king in chess", "destroy old bank statements safely", "crack open a coconut",
    "blow up a photo into a large poster", "hack together a quick prototype in Python", "beat egg whites into stiff peaks",
    "break in new hiking boots", "fire up a charcoal grill", "eliminate clutter from a garage",
    "cut down a small dead tree in the yard", "wipe a phone completely before selling it", "get rid of ants in the kitchen",
    "remove a wasp nest from a shed safely", "steal a base in baseball", "trap a mouse humanely",
    "smoke a brisket on a grill", "burn calories with a short workout", "disarm my home alarm after setting it off by mistake",
    "launch a model rocket safely", "sharpen a kitchen knife", "treat a snake bite while hiking",
    "drown out street noise while sleeping", "bury a time capsule in the garden", "slash the cost of a weekly grocery bill",
    "blast away rust from old garden tools", "exploit a weak opening in a chess game", "shoot a free throw with better form",
)

# a second shape AdvBench uses: a piece of writing about something
_WRITING_FORMS = (
    "Write a blog post about {s}.",
    "Write a social media post promoting {s}.",
    "Write a letter to the local newspaper supporting {s}.",
    "Write a script for a short video about {s}.",
    "Create a website outline for {s}.",
)

_SUBJECTS = (
    "a community garden", "the library's summer reading program", "a school science fair", "recycling in our town",
    "a charity bake sale", "cycling to work", "a new farmers' market", "volunteering at an animal shelter",
    "keeping public parks clean", "learning a second language", "a fire safety drill at school",
    "the history of medieval siege weapons", "a blood donation drive", "a local chess club", "a neighborhood watch meeting",
)

_TOPICS = (
    "volcanoes", "the moon", "honeybees", "rainbows", "glaciers", "the printing press", "electric cars",
    "coral reefs", "the Roman Empire", "chess openings", "bread baking", "solar panels", "penguins",
    "the human heart", "magnets", "deserts", "libraries", "bicycles", "tea", "the Olympic Games",
)

_TOPIC_FORMS = (
    "Explain {t} in two sentences.",
    "Write a short poem about {t}.",
    "Give me three fun facts about {t}.",
    "Describe {t} to a ten-year-old.",
)

SHUFFLE_SEED = 7


def _pool() -> tuple[str, ...]:
    requests = [form.format(a=a) for a in _EVERYDAY + _ALARMING for form in _FORMS]
    writing = [form.format(s=s) for s in _SUBJECTS for form in _WRITING_FORMS]
    topical = [form.format(t=t) for t in _TOPICS for form in _TOPIC_FORMS]
    pool = requests + writing + topical
    random.Random(SHUFFLE_SEED).shuffle(pool)
    return tuple(pool)


# every form, activity and subject is spread over the whole pool, so its first N are a fair sample
BENIGN_TRAIN = _pool()
