"""Greedy batched generation with left padding and a shared prompt prefix run once."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..calibration.encoding import format_prompts
from ..calibration.kv_cache import cache_argument
from ..calibration.prefix import MIN_SHARED_PREFIX, prefix_cache, repeated, shared_prefix_length


def pad_left(tokenizer) -> None:
    """Batched decoding pads on the left, so every prompt ends where generation starts."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
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
    prefix_len = shared_prefix_length(encoded)
    prefix = encoded[0][:prefix_len] if encoded else []
    device = next(model.parameters()).device
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
