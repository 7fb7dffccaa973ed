"""Greedy batched generation with left padding and a shared prompt prefix run once."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..calibration.encoding import format_prompts
from ..errors import RealignError
from ..io.placement import input_device
from ..calibration.kv_cache import cache_argument
from ..calibration.prefix import MIN_SHARED_PREFIX, prefix_cache, repeated, shared_prefix_length


def pad_left(tokenizer) -> None:
    """Batched decoding pads on the left, so every prompt ends where generation starts."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def context_length(model, tokenizer) -> int | None:
    """The number of positions the model takes (None when neither it nor the tokenizer says)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else None


def fit_context(tokenizer, encoded: list[list[int]], templated: bool, limit: int) -> int:
    """Cut every prompt longer than `limit` tokens in place, keeping the template around it (its
    start and the assistant header generation continues from) and the start of the prompt's
    own text. Returns how many prompts were cut."""
    long = [i for i, ids in enumerate(encoded) if len(ids) > limit]
    if not long:
        return 0
    empty = tokenizer(format_prompts(tokenizer, [""])[0][0], add_special_tokens=not templated)["input_ids"]
    for i in long:
        ids = encoded[i]
        head = next((n for n, (a, b) in enumerate(zip(empty, ids)) if a != b), min(len(empty), len(ids)))
        tail = min(len(empty) - head, limit // 2)  # the template's closing tokens
        encoded[i] = ids[: limit - tail] + (ids[len(ids) - tail :] if tail else [])
    return len(long)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[list[str], bool]:
    """Greedy responses, batched with left padding; prompts are sorted by length so a batch
    pads little, and answers come back in the input order.

    The tokens every prompt starts with (a chat template's system prompt: half of a short
    prompt) are run once and their cache shared by every batch; the prompt's own tokens follow
    after the padding, with positions counted from the attention mask as if unpadded."""
    texts, templated = format_prompts(tokenizer, prompts)
    pad_left(tokenizer)
    # chat templates already carry the special tokens they want
    encoded = [tokenizer(t, add_special_tokens=not templated)["input_ids"] for t in texts]
    context = context_length(model, tokenizer)
    if context is not None:  # a prompt past the model's positions: cut it, and say so (`warn`)
        if context - max_new_tokens < 1:
            raise RealignError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens")
        cut = fit_context(tokenizer, encoded, templated, context - max_new_tokens)
        if cut and warn is not None:
            warn(f"{cut} prompt(s) longer than the model's context ({context} tokens, {max_new_tokens} of them for the answer) "
                 f"were truncated to {context - max_new_tokens} tokens")
    prefix_len = shared_prefix_length(encoded)
    prefix = encoded[0][:prefix_len] if encoded else []
    device = input_device(model)  # a dispatched model may keep its first parameter on meta
    # below MIN_SHARED_PREFIX tokens a cached prefix saves less than its copies cost
    cache = prefix_cache(model, torch.tensor([prefix], device=device)) if len(prefix) >= MIN_SHARED_PREFIX else None
    if cache is None:
        prefix = []
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    responses: list[str] = [""] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [encoded[i][len(prefix) :] for i in idx]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([prefix + [tokenizer.pad_token_id] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[1] * len(prefix) + [0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        extra = {}
        if cache is not None:
            extra[cache_argument(model)] = repeated(cache, len(idx))
        output = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **extra,
        )
        new_tokens = output[:, input_ids.shape[1] :]
        for i, text in zip(idx, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            responses[i] = text.strip()
        if on_batch:
            on_batch(len(idx))
    return responses, templated
