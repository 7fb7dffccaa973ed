"""Prompt encoding shared by generation, training and calibration: the model's chat template (or a
plain one), (prompt, response) token ids with labels on the response, and the left-padded batch
layout that lets a shared prompt prefix run once."""

from __future__ import annotations

from typing import Sequence

import torch

from .examples import Example


IGNORE = -100


PLAIN_TEMPLATE = "User: {prompt}\nAssistant:"


_PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def prompt_text(tokenizer, prompt: str, history: Sequence[tuple[str, str]] = ()) -> tuple[str, bool]:
    """One prompt (after earlier chat turns `history`, as (role, content)) ready for the model's
    answer: the chat template with the generation prompt, or the plain template when the
    tokenizer has none. Returns the text and whether the chat template was used."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": role, "content": content} for role, content in history]
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
    earlier = "".join(f"{_PLAIN_ROLES.get(role, role.capitalize())}: {content}\n" for role, content in history)
    return earlier + PLAIN_TEMPLATE.format(prompt=prompt), False


def format_prompts(tokenizer, prompts: Sequence[str]) -> tuple[list[str], bool]:
    """Prompts in the model's chat template (with the generation prompt), or the plain
    template when the tokenizer has none. Returns the texts and whether the chat template was used."""
    texts = [prompt_text(tokenizer, p)[0] for p in prompts]
    return texts, bool(getattr(tokenizer, "chat_template", None))


def encode_parts(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the prompt as generation sees it, the response with the
    end-of-sequence token that teaches the model to stop."""
    # the same prompt text that generation uses, so training and evaluation agree
    prefix, templated = prompt_text(tokenizer, example.prompt, example.history)
    if not templated:
        prefix += " "
    prompt_ids = tokenizer(prefix, add_special_tokens=not templated)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids, response_ids


def encode(tokenizer, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) with labels only on the response tokens and the end-of-sequence token."""
    prompt_ids, response_ids = encode_parts(tokenizer, example)
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]
    return ids, labels


def collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int, prefix_len: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded, so every response ends at the last position and the loss needs logits for
    the last few positions only (the vocabulary projection is a large share of a small model).

    With `prefix_len`, the first tokens (the same in every row) stay in front and the padding
    goes between them and the rest: [prefix][pad][tokens]; `response_loss` then runs the prefix
    once for the whole batch. Positions follow the attention mask, so each row is seen as if
    unpadded either way."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        pad = width - len(ids)
        if prefix_len:
            input_ids[row, :prefix_len] = torch.tensor(ids[:prefix_len])
            mask[row, :prefix_len] = 1
        input_ids[row, pad + prefix_len :] = torch.tensor(ids[prefix_len:])
        mask[row, pad + prefix_len :] = 1
        labels[row, width - len(labs) :] = torch.tensor(labs)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "prefix_len": prefix_len}
