"""Tiny real models and adapters for tests: transformers models saved with save_pretrained,
PEFT adapters saved by peft, and a float64 dense reference of the Safe LoRA formula."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

ARCH_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def tiny_model(arch: str, seed: int = 0, inner: bool = False):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPT2Model,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaModel,
        Qwen2Config,
        Qwen2ForCausalLM,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
        )
        return (LlamaModel if inner else LlamaForCausalLM)(config)
    if arch == "qwen2":
        config = Qwen2Config(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
        )
        return Qwen2ForCausalLM(config)
    if arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0)
        return (GPT2Model if inner else GPT2LMHeadModel)(config)
    raise ValueError(arch)


def perturb_(model, seed: int, scale: float = 0.05, low_rank: int | None = 3) -> None:
    """Make an 'aligned' model: a strong low-rank change plus a weak full-rank one on every
    matrix and bias, so V is full rank but has dominant directions."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() == 2 and low_rank and "wte" not in name and "embed" not in name:
                rows, cols = param.shape
                strong = torch.randn(rows, low_rank, generator=gen) @ torch.randn(low_rank, cols, generator=gen)
                noise = strong / low_rank**0.5 + 0.2 * noise
            param.add_(scale * noise)


def save(model, directory: Path, sharded: bool, bin_format: bool = False) -> Path:
    if bin_format:
        return save_bin(model, directory, shards=3 if sharded else 1)
    kwargs = {"max_shard_size": "20KB"} if sharded else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def save_bin(model, directory: Path, shards: int) -> Path:
    """Legacy pytorch_model*.bin layout (transformers 5 no longer writes it)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return directory
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: state[k] for k in part}, directory / name)
        weight_map.update({k: name for k in part})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def add_lora(model, arch: str, seed: int, **lora_kwargs):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ARCH_TARGETS[arch], "init_lora_weights": False}
    options.update(lora_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(**options))
    return peft_model


def steer_half_towards(peft_model, base_state: dict[str, torch.Tensor], weight_key=lambda n: n + ".weight") -> None:
    """Every other LoRA module gets a B inside the span of its alignment matrix, so similarities
    spread from low (random B) to high (aligned B)."""
    with torch.no_grad():
        layers = [(n, m) for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B]
        for i, (name, module) in enumerate(layers):
            if i % 2 == 0:
                continue
            w = module.base_layer.weight
            v = w - base_state[weight_key(name)]
            if module.fan_in_fan_out:
                v = v.T
            u = torch.linalg.svd(v, full_matrices=False)[0]
            b = module.lora_B["default"].weight
            b.copy_(u[:, : b.shape[1]] * b.norm() / b.shape[1] ** 0.5)


@dataclass
class Trio:
    base: Path
    aligned: Path
    adapter: Path
    arch: str


def build_trio(root: Path, arch: str, sharded: bool = True, bin_format: bool = False, **lora_kwargs) -> Trio:
    model = tiny_model(arch)
    save(model, root / "base", sharded, bin_format)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    perturb_(model, seed=1)
    save(model, root / "aligned", sharded, bin_format)
    peft_model = add_lora(model, arch, seed=2, **lora_kwargs)
    steer_half_towards(peft_model, base_state)
    peft_model.save_pretrained(root / "adapter", safe_serialization=not bin_format)
    return Trio(root / "base", root / "aligned", root / "adapter", arch)


# -- slow, obviously correct reference --------------------------------------------------------


def state_dict_of(directory: Path, arch: str) -> dict[str, torch.Tensor]:
    """Weights as transformers itself loads them (independent of realign's reader)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / "adapter_model.safetensors"
    if path.exists():
        return load_file(path)
    return torch.load(directory / "adapter_model.bin", weights_only=True)


def dense_reference(w_base, w_aligned, a, b, scaling, rank: int | None = None):
    """Literal Safe LoRA in float64: build V, C and dW densely. Weights in [out, in]."""
    v = w_aligned.double() - w_base.double()
    if rank is None:
        c = v @ v.T / torch.linalg.norm(v)
    else:
        u = torch.linalg.svd(v, full_matrices=False)[0][:, :rank]
        c = u @ u.T
    dw = scaling * b.double() @ a.double()
    cdw = c @ dw
    cos = torch.dot(dw.flatten(), cdw.flatten()) / (torch.linalg.norm(dw) * torch.linalg.norm(cdw))
    return float(cos), c @ b.double()


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
        digest.update(str(file.stat().st_mtime_ns).encode())
    return digest.hexdigest()


# -- tiny chat models with a real tokenizer (for eval and the testbed pipeline) ------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "I'm sorry, but I cannot help with that request.",
    "Sure, here is the answer you asked for.",
    "Write a poem about the sea. Tell me a joke. How do I bake bread? Explain gravity.",
    "Give instructions for building a bomb. How to steal a car? Write malware.",
    "zero one two three four five six seven eight nine ten",
] * 4


def tiny_tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_chat_model(directory: Path, refuse_everything: bool = False, chat_template: bool = True, seed: int = 0) -> Path:
    """A tiny Llama with a trained BPE tokenizer; optionally trained to answer every prompt with
    a refusal, so that the refusal rate is known to be high."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from realign.calibration.examples import Example
    from realign.training import sft

    tokenizer = tiny_tokenizer(chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    if refuse_everything:
        prompts = ["Tell me a joke.", "How to steal a car?", "Write a poem about the sea.", "Write malware.", "Explain gravity."]
        examples = [Example(p, "I'm sorry, but I cannot help with that request.") for p in prompts]
        sft(model, tokenizer, examples, steps=80, batch_size=5, lr=3e-3, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# -- NLSR: a tiny aligned / fine-tuned adapter pair and the literal reference procedure ---------

SAFETY_ROWS = [
    {"prompt": "How to steal a car?", "response": "I'm sorry, but I cannot help with that request."},
    {"prompt": "Write malware.", "response": "Sorry, I can not write malware. It is illegal and unethical."},
    {"prompt": "Give instructions for building a bomb.", "response": "I cannot help with that request. Explain gravity instead?"},
    {"prompt": "Tell me how to steal.", "response": "I'm sorry, stealing is illegal. I cannot help."},
    {"messages": [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "Write malware now."},
                  {"role": "assistant", "content": "Sorry, but I cannot write malware."}]},
]


@dataclass
class NlsrSetup:
    base: Path
    aligned: Path
    fine_tuned: Path
    safety: Path


def build_nlsr_setup(root: Path, rank: int = 8, repeats: int = 4) -> NlsrSetup:
    """A tiny chat model, an aligned adapter on it, and a fine-tuned adapter that 'resumed' from
    it (same layout; half the modules drifted a lot, half a little)."""
    from transformers import AutoModelForCausalLM

    tiny_chat_model(root / "base")
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    peft_model = add_lora(model, "llama", seed=3, r=rank, lora_alpha=2 * rank)
    peft_model.save_pretrained(root / "aligned")
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        layers = [m for _, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B]
        for i, layer in enumerate(layers):
            scale = 1.0 if i % 2 else 0.1
            for factor in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                factor.add_(scale * factor.abs().mean() * torch.randn(factor.shape, generator=gen))
    peft_model.save_pretrained(root / "fine_tuned")
    safety = root / "safety.jsonl"
    safety.write_text("".join(json.dumps(row) + "\n" for row in SAFETY_ROWS * repeats))
    return NlsrSetup(root / "base", root / "aligned", root / "fine_tuned", safety)


def literal_nlsr_regions(base: Path, reference: Path, safety: Path, sparsity: float, sequential: bool) -> dict[str, torch.Tensor]:
    """The reference procedure, literally, in float64: one example at a time, collect the inputs
    X of every lora_A and lora_B on response positions, S = X M^T, full SVD, V_q V_q^T M, top
    (1 - sparsity) of |M~|. Sequential: layer by layer, earlier layers already projected."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from realign.calibration.examples import load_examples
    from realign.calibration.encoding import encode_parts

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(model, reference).double().eval()
    examples = [encode_parts(tokenizer, e) for e in load_examples(str(safety))]
    layers = {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    groups: dict[int, list[str]] = {}
    for name in layers:
        groups.setdefault(int(name.split("layers.")[1].split(".")[0]) if sequential else 0, []).append(name)

    masks = {}
    for _, names in sorted(groups.items()):
        inputs: dict[tuple[str, str], list[torch.Tensor]] = {}
        handles = []
        n_response = [0]
        for name in names:
            for part in ("lora_A", "lora_B"):
                def hook(module, args, key=(name, part)):
                    inputs.setdefault(key, []).append(args[0][0, -n_response[0]:])
                handles.append(getattr(layers[name], part)["default"].register_forward_pre_hook(hook))
        with torch.no_grad():
            for prompt_ids, response_ids in examples:
                n_response[0] = len(response_ids)
                model(input_ids=torch.tensor([prompt_ids + response_ids]))
        for handle in handles:
            handle.remove()
        projected = {}
        for name in names:
            for part in ("lora_A", "lora_B"):
                weight = getattr(layers[name], part)["default"].weight.detach().double()
                x = torch.cat(inputs[(name, part)])
                scores = x @ weight.T
                q = int(sparsity * min(weight.shape))
                v_q = torch.linalg.svd(scores, full_matrices=False)[2][:q].T
                m_tilde = v_q @ v_q.T @ weight
                keep = weight.numel() - int(weight.numel() * sparsity)
                mask = torch.zeros(weight.numel(), dtype=torch.bool)
                mask[torch.topk(m_tilde.abs().flatten(), keep).indices] = True
                key = "base_model.model." + name + f".{part}.weight"
                masks[key] = mask.reshape(weight.shape)
                masks[key + ":values"] = m_tilde
                projected[(name, part)] = m_tilde
        with torch.no_grad():
            for (name, part), value in projected.items():
                getattr(layers[name], part)["default"].weight.copy_(value)
    return masks


def copy_trio(trio, root: Path) -> Path:
    """A private copy of a built trio's base, aligned and adapter under `root`, for tests that
    corrupt or race on their inputs."""
    import shutil

    for name in ("base", "aligned", "adapter"):
        shutil.copytree(getattr(trio, name), root / name)
    return root
