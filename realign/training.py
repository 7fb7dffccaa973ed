"""Supervised fine-tuning with a response-only loss: the small training loop behind the testbed
(and usable on any causal LM, with or without a PEFT adapter). Deterministic for a seed."""

from __future__ import annotations

import random
from typing import Callable, Sequence

import torch

from .calibration.encoding import IGNORE, collate, encode, encode_parts
from .calibration.examples import Example
from .calibration.kv_cache import cache_argument
from .calibration.prefix import prefix_cache, repeated, trainable_prefix_length
from .errors import RealignError
from .io.placement import input_device


# names the batch order `sft` draws for a seed; caches and resumable runs keyed by it are not
# reused across a change of batching
BATCHING = "length-grouped/16"


LOSSES = ("response", "full")
# constant: realign's default (the rate the user gives, every step); linear: decayed to zero over
# the run with no warm-up, as the Hugging Face Trainer does by default (SaLoRA's reference)
LR_SCHEDULES = ("constant", "linear")


def scheduled_lr(lr: float, step: int, steps: int, schedule: str) -> float:
    """The learning rate of 0-based `step` of `steps`: `lr`, or lr * (steps - step) / steps."""
    if schedule == "linear":
        return lr * (steps - step) / steps
    return lr


def pack_blocks(tokenizer, examples: Sequence[Example], block_size: int) -> list[tuple[list[int], list[int]]]:
    """Every example's tokens (the prompt as generation sees it, the response, end of sequence)
    as one stream, cut into blocks of `block_size` with labels on every token: the full-sequence
    loss on packed blocks that SaLoRA's reference trains with. The remainder shorter than a
    block is dropped, as the common language-modelling recipe does."""
    if block_size < 2:
        raise RealignError("--block-size must be at least 2")
    stream: list[int] = []
    for example in examples:
        prompt_ids, response_ids = encode_parts(tokenizer, example)
        stream += prompt_ids + response_ids
    if len(stream) < block_size:
        raise RealignError(f"the training data has {len(stream)} tokens, fewer than one block of --block-size {block_size}")
    return [(stream[i : i + block_size], stream[i : i + block_size]) for i in range(0, len(stream) - block_size + 1, block_size)]


def _prefix_cache(model, batch: dict[str, torch.Tensor]):
    """The shared prefix run once (batch 1, gradients kept) and its cache repeated for every row;
    None when there is no prefix or the model does not fill a cache it is given."""
    prefix_len = int(batch.get("prefix_len", 0))
    if not prefix_len:
        return None
    cache = prefix_cache(model, batch["input_ids"][:1, :prefix_len], logits_to_keep=1)
    return None if cache is None else repeated(cache, batch["input_ids"].shape[0], fresh=False)


def response_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over labelled tokens, computing logits only where labels live."""
    labels, mask = batch["labels"], batch["attention_mask"]
    labelled = (labels != IGNORE).any(dim=0).nonzero()
    # logits from the position before the first label on; a label at position 0 (a packed block)
    # has no position before it and is not predicted, as in the model's own shifted loss
    keep = min(labels.shape[1] - int(labelled[0]) + 1, labels.shape[1]) if len(labelled) else 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    inputs = {"input_ids": batch["input_ids"], "position_ids": positions, "use_cache": False}
    width = labels.shape[1]
    cache = _prefix_cache(model, batch)
    if cache is not None:
        skip = int(batch["prefix_len"])
        inputs = {"input_ids": batch["input_ids"][:, skip:], "position_ids": positions[:, skip:], cache_argument(model): cache}
        width -= skip
        keep = min(keep, width)
    # positions as a tensor, not a count: the count slices the hidden states to a strided view,
    # which the vocabulary projection then runs as a batched matmul against a broadcast weight
    # (3x slower here, and the projection is a third of a step on answers of 40 tokens); indexing
    # gathers them into one contiguous block for a single matmul
    kept = torch.arange(width - keep, width, device=labels.device)
    logits = model(**inputs, attention_mask=mask, logits_to_keep=kept).logits
    targets = labels[:, -keep + 1 :] if keep > 1 else labels[:, :0]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)),
        targets.reshape(-1), ignore_index=IGNORE,
    )


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random, window: int = 16) -> list[list[int]]:
    """One epoch of batches: a shuffled order, cut into windows of `window` batches, sorted by
    length within each window and batched, the batches shuffled again. A batch costs its longest
    member times its size, so grouping lengths saves the padding (a fifth of the testbed's attack
    steps, where short task examples meet long poison answers) while batches stay random."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = window * batch_size
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def training_items(tokenizer, examples: Sequence[Example], loss: str, max_length: int, block_size: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) that `sft` batches: one per example with the response-only loss,
    packed blocks (`pack_blocks`) with the full loss."""
    if loss not in LOSSES:
        raise RealignError(f"--loss must be one of {', '.join(LOSSES)}, got '{loss}'")
    if loss == "full":
        return pack_blocks(tokenizer, examples, block_size)
    return [encode(tokenizer, e, max_length) for e in examples]


# One function: the training loop, its resume replay and its checkpoints share the optimizer and the
# batch order.
def sft(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 5e-4,
    max_length: int = 256,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    params: list[torch.nn.Parameter] | None = None,
    start_step: int = 0,
    optimizer_state: dict | None = None,
    checkpoint: Callable[[int, torch.optim.Optimizer], None] | None = None,
    checkpoint_every: int = 0,
    loss: str = "response",
    block_size: int = 128,
    lr_schedule: str = "constant",
) -> list[float]:
    """Train `params` (default: the model's trainable parameters) for `steps` AdamW steps on
    shuffled, length-grouped batches (`length_grouped_batches`); returns the loss of every step run.

    Resuming (`start_step`, `optimizer_state`) replays the data order up to that step, so a
    resumed run sees the same batches as an uninterrupted one. `checkpoint(step, optimizer)` is
    called every `checkpoint_every` steps and after the last. `loss`: "response" (labels on the
    response tokens, one example a row) or "full" (every token, packed `block_size` blocks).
    `lr_schedule`: see `scheduled_lr`; the rate depends on the step alone, so a resumed run
    follows the same schedule.
    """
    if lr_schedule not in LR_SCHEDULES:
        raise RealignError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got '{lr_schedule}'")
    if not examples:
        raise RealignError("no training examples")
    encoded = training_items(tokenizer, examples, loss, max_length, block_size)
    if all(all(label == IGNORE for label in labels) for _, labels in encoded):
        raise RealignError("no example has response tokens left after truncation to max_length")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = input_device(model)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if optimizer_state is not None:
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RealignError(f"the saved optimizer state does not fit this run ({reason}); use --restart to start over") from None
    rng = random.Random(seed)
    torch.manual_seed(seed)
    lengths = [len(ids) for ids, _ in encoded]
    prefix_len = trainable_prefix_length(encoded)
    pending: list[list[int]] = []
    losses = []
    model.train()
    for step in range(steps):
        if not pending:
            pending = length_grouped_batches(lengths, batch_size, rng)
        chosen = pending.pop()
        if step < start_step:
            continue
        batch = collate([encoded[i] for i in chosen], pad_id, prefix_len)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        for group in optimizer.param_groups:
            group["lr"] = scheduled_lr(lr, step, steps, lr_schedule)
        loss = response_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step:
            on_step(step + 1, losses[-1])
        if checkpoint and ((checkpoint_every and (step + 1) % checkpoint_every == 0) or step + 1 == steps):
            checkpoint(step + 1, optimizer)
    model.eval()
    return losses
