"""Forward hooks that accumulate Gram matrices of module inputs or outputs on response tokens.

The methods need second moments of features (NLSR: G = sum z z^T of a LoRA module's lora_A
output; SaLoRA: Sigma = sum x x^T of a module's input), never the features themselves. So a
calibration pass adds each batch's z^T z into a float64 accumulator and drops the batch: memory
is one k x k matrix per tap, whatever the amount of data."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from ..errors import RealignError
from ..io.placement import input_device
from .encoding import IGNORE, collate, encode_parts
from .examples import Example, load_examples
from .kv_cache import cache_argument
from .prefix import prefix_cache, repeated, trainable_prefix_length


@dataclass
class Calibration:
    """Encoded calibration examples: token ids and, per position, whether its own token belongs
    to the response (the positions whose features count)."""

    encoded: list[tuple[list[int], list[int]]]
    pad_id: int
    truncated_prompts: int  # prompts cut from the left to fit the model's context
    response_tokens: int

    def shared_prefix(self) -> int:
        """Leading tokens every example shares, all before any response token (0 if too few)."""
        return trainable_prefix_length(self.encoded)

    def batches(self, batch_size: int, prefix_len: int = 0) -> Iterable[dict[str, torch.Tensor]]:
        """Batches laid out [prefix][pad][rest] when `prefix_len` is given (see `collate`)."""
        # sorted by length so a batch pads little; the order does not change a sum
        order = sorted(range(len(self.encoded)), key=lambda i: len(self.encoded[i][0]))
        for start in range(0, len(order), batch_size):
            batch = collate([self.encoded[i] for i in order[start : start + batch_size]], self.pad_id, prefix_len)
            batch["response"] = batch.pop("labels") != IGNORE
            del batch["prefix_len"]
            yield batch


def context_length(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode_calibration(
    tokenizer, examples: Sequence[Example], max_response_tokens: int, context: int | None
) -> Calibration:
    """Responses capped at `max_response_tokens` (the end-of-sequence token included); a prompt
    that would overflow the context loses its beginning, so it still leads into the response."""
    if max_response_tokens < 1:
        raise RealignError("--max-response-tokens must be at least 1")
    encoded, truncated = [], 0
    for example in examples:
        prompt_ids, response_ids = encode_parts(tokenizer, example)
        response_ids = response_ids[:max_response_tokens]
        if context is not None and len(prompt_ids) + len(response_ids) > context:
            response_ids = response_ids[: max(1, context - 1)]
            keep = context - len(response_ids)
            prompt_ids = prompt_ids[len(prompt_ids) - keep :] if keep > 0 else []
            truncated += 1
        if not response_ids:
            continue
        encoded.append((prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids))
    tokens = sum(len(r) - r.count(IGNORE) for _, r in encoded)
    if tokens == 0:
        raise RealignError("the calibration data has no response tokens (empty responses?)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0  # padded positions are masked out of attention and never counted
    return Calibration(encoded, pad_id, truncated, tokens)


def load_calibration(model, tokenizer, spec: str, max_samples: int | None, max_response_tokens: int, role: str = "data") -> Calibration:
    """The examples of `spec` (the first `max_samples`), encoded for `model`'s context."""
    examples = load_examples(spec, role)
    if max_samples is not None:
        examples = examples[:max_samples]
    return encode_calibration(tokenizer, examples, max_response_tokens, context_length(model))


def calibration_stats(calibration: Calibration, passes: int) -> dict:
    return {"examples": len(calibration.encoded), "response_tokens": calibration.response_tokens,
            "truncated_prompts": calibration.truncated_prompts, "passes": passes}


def checked(grams: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`grams`, after making sure none overflowed."""
    for name, gram in grams.items():
        if not torch.isfinite(gram).all():
            raise RealignError(f"module '{name}': the calibration features overflow (Inf/NaN); check the model and data")
    return grams


def logits_kwargs(model, modules) -> dict:
    """Forward arguments that skip the vocabulary projection for all but one position (the
    features are all we need), unless one of `modules` is that projection and needs them all."""
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output_layer is None or any(m is output_layer for m in modules):
        return {}
    return {"logits_to_keep": 1}


class _Stop(Exception):
    """Raised by a hook to end a forward pass once everything it needs has run."""


def _stop(*_) -> None:
    raise _Stop


@dataclass(frozen=True)
class Tap:
    """Where a Gram comes from: a module, which side of it (input or output), and an optional
    map applied to the features first (for example a LoRA down-projection)."""

    module: torch.nn.Module
    side: str = "output"  # "input" or "output"
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


# One function, not several: the hooks and the batch loop share the state of a pass (the batch's
# mask, the silenced prefix, the products seen).
@torch.no_grad()
def accumulate_grams(
    model,
    calibration: Calibration,
    taps: dict[str, Tap],
    batch_size: int,
    *,
    stop_after: torch.nn.Module | None = None,
    forward_kwargs: dict | None = None,
    on_batch: Callable[[int], None] | None = None,
    share_prefix: bool = True,
) -> dict[str, torch.Tensor]:
    """sum over response positions of f f^T for every tap, in float64 on the device the model
    takes its inputs on.

    Taps that see the same tensor (q, k and v read one input) share one product. `stop_after`
    ends each forward pass after that module has run, when later layers are not needed. The
    prompt prefix all examples share (a chat template's system prompt) holds no response
    position, so with `share_prefix` it runs once per pass and only the rest runs per row.

    On a model accelerate spread over devices, each Gram accumulates on the device its layer
    computes on (no transfer per batch) and all move to the input device at the end.
    """
    device = input_device(model)
    grams: dict[str, torch.Tensor] = {}
    current: dict = {}  # "masks": the batch's response positions, flattened, by device; "prefix": taps silenced
    # (id of the tensor, transform) -> (weak reference to it, its product): a weak reference, so
    # a freed tensor whose id is reused by a later layer's tensor is never mistaken for it
    shared: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}

    def hook_for(name: str, tap: Tap):
        def hook(module, args, output):
            if current.get("prefix"):
                return
            features = args[0] if tap.side == "input" else output
            key = (id(features), id(tap.transform))
            seen = shared.get(key)
            product = seen[1] if seen is not None and seen[0]() is features else None
            if product is None:
                rows = features.reshape(-1, features.shape[-1])[mask_on(features.device)]
                if tap.transform is not None:
                    rows = tap.transform(rows)
                rows = rows.double()
                product = rows.T @ rows
                shared[key] = (weakref.ref(features), product)
            if name in grams:
                grams[name] += product
            else:
                grams[name] = product.clone()

        return hook

    def mask_on(where: torch.device) -> torch.Tensor:
        masks = current["masks"]
        if where not in masks:
            masks[where] = masks[device].to(where)
        return masks[where]

    handles = [tap.module.register_forward_hook(hook_for(name, tap)) for name, tap in taps.items()]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(_stop))

    def forward(**inputs) -> None:
        try:
            model(**inputs, **(forward_kwargs or {}))
        except _Stop:
            pass

    try:
        prefix_len = calibration.shared_prefix() if share_prefix else 0
        prefix = None
        if prefix_len:
            prefix_ids = torch.tensor([calibration.encoded[0][0][:prefix_len]], device=device)
            current["prefix"] = True  # the taps stay silent while the prefix runs
            try:
                prefix = prefix_cache(model, prefix_ids, forward)
            finally:
                current["prefix"] = False
            prefix_len = prefix_len if prefix is not None else 0
        for batch in calibration.batches(batch_size, prefix_len):
            mask = batch.pop("response")
            batch = {k: v.to(device) for k, v in batch.items()}
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
            inputs = {"input_ids": batch["input_ids"], "position_ids": positions}
            if prefix is not None:
                inputs = {"input_ids": batch["input_ids"][:, prefix_len:], "position_ids": positions[:, prefix_len:],
                          cache_argument(model): repeated(prefix, int(mask.shape[0])), "use_cache": True}
                mask = mask[:, prefix_len:]
            current["masks"] = {device: mask.reshape(-1).to(device)}  # and copies per device as layers ask
            shared.clear()
            forward(**inputs, attention_mask=batch["attention_mask"])
            if on_batch:
                on_batch(int(mask.shape[0]))
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in taps if name not in grams]
    if missing:
        raise RealignError(f"module '{missing[0]}' never ran during the calibration pass; is it part of the model's forward?")
    return {name: gram.to(device) for name, gram in grams.items()}
