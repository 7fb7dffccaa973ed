"""`realign demo --tiny`: a tiny random base / aligned / fine-tuned trio, built with transformers and
peft, and Safe LoRA run on it end to end. It exercises the real I/O and the real method; the
numbers mean nothing about safety (the models are random); `realign demo` is the real example.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..methods.safelora.adapter import safelora
from ..testbed.stages import LINEAR_TARGETS


def build_trio(root: Path, seed: int = 0) -> dict[str, Path]:
    """base: random tiny Llama (sharded); aligned: base plus a full-rank change; adapter: a LoRA
    on aligned whose update follows the alignment direction in some modules and not in others."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
    )
    paths = {name: root / name for name in ("base", "aligned", "adapter")}
    model = LlamaForCausalLM(config)
    model.save_pretrained(paths["base"], max_shard_size="200KB")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                # alignment moves few directions strongly and the rest a little
                rows, cols = param.shape
                strong = torch.randn(rows, 4) @ torch.randn(4, cols) / 2
                param.add_(0.05 * param.std() * (strong + 0.1 * torch.randn_like(param)))
    model.save_pretrained(paths["aligned"], max_shard_size="200KB")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # a transformers deprecation inside peft
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(LINEAR_TARGETS), init_lora_weights=False))
    with torch.no_grad():
        for i, (name, module) in enumerate(_lora_layers(peft_model)):
            if i % 2:  # every other module: an update inside the alignment directions
                v = module.base_layer.weight - base_state[name + ".weight"]
                u = torch.linalg.svd(v, full_matrices=False)[0][:, :4].repeat(1, 2)
                module.lora_B["default"].weight.copy_(u * module.lora_B["default"].weight.norm())
    peft_model.save_pretrained(paths["adapter"])
    return paths


def _lora_layers(peft_model):
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            yield name, module


def run_demo(workdir: Path | None, log: Callable[[str], None] = lambda _: None):
    if workdir is None:
        holder = tempfile.TemporaryDirectory(prefix="realign-demo-")
        root = Path(holder.name)
    else:
        holder, root = None, workdir
        root.mkdir(parents=True, exist_ok=True)
    try:
        log(f"building a tiny random Llama trio in {root} (random weights: the similarities show the mechanics, not safety)")
        paths = build_trio(root)
        out = root / "safelora-out"
        report = safelora(str(paths["base"]), str(paths["aligned"]), str(paths["adapter"]), out, force=True)
        log(f"Safe LoRA wrote {out}" + ("" if workdir else " (temporary: pass --workdir to keep it)"))
        return report
    finally:
        if holder is not None:
            holder.cleanup()
