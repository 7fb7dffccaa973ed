"""The prompt prefix every row of a batch shares (a chat template's system prompt): found once,
run once, and its key/value cache repeated for every row. Generation, training and calibration
all use these, so their outputs equal those of whole rows (tested)."""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from .encoding import IGNORE
from .kv_cache import cache_argument


# below this many shared prompt tokens a cached prefix saves less than its copies cost
MIN_SHARED_PREFIX = 8


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens every sequence starts with, leaving at least one token of each after it."""
    if len(sequences) < 2:
        return 0
    first, shortest = sequences[0], min(len(s) for s in sequences)
    n = 0
    while n < shortest - 1 and all(s[n] == first[n] for s in sequences):
        n += 1
    return n


def trainable_prefix_length(encoded: Sequence[tuple[list[int], list[int]]]) -> int:
    """The prompt tokens every example starts with (a chat template's system prompt), stopping
    short of the token before each response: that token's logits predict the first label, and the
    shared part yields no logits. 0 when too short to pay."""
    shared = shared_prefix_length([ids for ids, _ in encoded])
    first_label = min(next((i for i, label in enumerate(labels) if label != IGNORE), len(labels)) for _, labels in encoded)
    n = min(shared, first_label - 1)
    return n if n >= MIN_SHARED_PREFIX else 0


def prefix_cache(model, prefix_ids: torch.Tensor, forward=None, **kwargs):
    """The key/value cache of `prefix_ids` (one row), filled by `forward` (default: the model
    itself; `kwargs` go along); None when the model does not fill a cache it is given (then rows
    run whole)."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # a config without layer types: layers are created as they are filled
        cache = DynamicCache()
    (forward or model)(input_ids=prefix_ids, use_cache=True, **{cache_argument(model): cache}, **kwargs)
    return cache if cache.get_seq_length() > 0 else None


def repeated(cache, rows: int, fresh: bool = True):
    """`cache` repeated for a batch of `rows`; a forward pass extends the cache it is given, so
    with `fresh` (the default) a copy is repeated and `cache` stays as it was."""
    if fresh:
        cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(rows)
    return cache
