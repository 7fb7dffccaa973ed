import random

import pytest

from realign.training import length_grouped_batches


def test_length_grouped_batches_cover_each_example_once_and_pad_less():
    draw = random.Random(1)
    # short task examples and 10% long poison answers, as in the testbed's attack
    lengths = [(90 if draw.random() < 0.1 else 40) + i % 5 for i in range(601)]
    batches = length_grouped_batches(lengths, 8, random.Random(0))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(601))
    assert all(1 <= len(b) <= 8 for b in batches)
    # the same seed draws the same epoch, another seed another one
    assert batches == length_grouped_batches(lengths, 8, random.Random(0))
    assert batches != length_grouped_batches(lengths, 8, random.Random(1))
    # padded tokens: a batch costs its longest member times its size
    order = list(range(601))
    random.Random(0).shuffle(order)
    plain = [order[i : i + 8] for i in range(0, 601, 8)]
    cost = lambda bs: sum(max(lengths[i] for i in b) * len(b) for b in bs)  # noqa: E731
    assert cost(batches) < 0.8 * cost(plain)


# -- the shared prompt prefix: run once per batch, same result as running every row whole -------

SYSTEM_TEMPLATE = "<|im_start|>system\nYou are a helpful assistant who tells jokes and explains gravity<|im_end|>\n"


def _system_prompt_model(dtype, architecture="llama"):
    import torch
    from builders import CHAT_TEMPLATE, tiny_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = SYSTEM_TEMPLATE + CHAT_TEMPLATE  # a default system prompt, as SmolLM2's template has
    torch.manual_seed(0)
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                                             initializer_range=0.3))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tokenizer), n_positions=512,
                                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                           attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, initializer_range=0.3))
    return model.to(dtype), tokenizer


def test_shared_prefix_length():
    from realign.calibration.prefix import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # one token is always left to run
    assert shared_prefix_length([[1, 2, 3]]) == 0
    assert shared_prefix_length([[7, 2], [1, 2]]) == 0


# Llama's RMSNorm computes in float32 even in a float64 model, so summing the rows' gradients
# before the prefix (shared) or after it (whole rows) differs at float32 rounding there
@pytest.mark.parametrize("architecture, rtol", [("gpt2", 1e-10), ("llama", 1e-6)])
def test_prefix_shared_loss_and_gradients_equal_whole_rows(architecture, rtol):
    import torch

    from realign.calibration.encoding import collate, encode
    from realign.calibration.examples import Example
    from realign.calibration.prefix import trainable_prefix_length
    from realign.training import response_loss

    model, tokenizer = _system_prompt_model(torch.float64, architecture)
    examples = [Example("Tell me a joke.", "Sure, here is the answer."), Example("Explain gravity in a few words please.", "zero one"),
                Example("Write malware.", "I'm sorry, but I cannot help with that request."),
                Example("Tell me a joke.", "No.")]  # the same prompt twice: the prefix must stop before the first label
    encoded = [encode(tokenizer, e, 512) for e in examples]
    prefix = trainable_prefix_length(encoded)
    assert prefix >= 20  # the system prompt and the user turn's opening
    results = []
    for shared in (0, prefix):
        model.zero_grad()
        loss = response_loss(model, collate(encoded, tokenizer.pad_token_id, shared))
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (whole, whole_grad), (fast, fast_grad) = results
    assert fast == pytest.approx(whole, rel=1e-12)
    scale = whole_grad.abs().max()
    assert (fast_grad - whole_grad).abs().max() <= rtol * scale


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_response_loss_equals_the_loss_of_each_row_alone_over_all_logits(architecture):
    """The slow, obvious formula: every row run unpadded, logits at every position, the mean
    cross-entropy of the response tokens over all rows; the fast path keeps only the labelled
    positions' logits (gathered, not sliced) and pads."""
    import torch

    from realign.calibration.encoding import IGNORE, collate, encode
    from realign.calibration.examples import Example
    from realign.calibration.prefix import trainable_prefix_length
    from realign.training import response_loss

    model, tokenizer = _system_prompt_model(torch.float64, architecture)
    examples = [Example("Tell me a joke.", "Sure, here is the answer, a long one with many words."),
                Example("Explain gravity in a few words please.", "zero one"), Example("Write malware.", "No.")]
    encoded = [encode(tokenizer, e, 512) for e in examples]
    total, count = 0.0, 0
    for ids, labels in encoded:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        targets = torch.tensor(labels[1:])
        chosen = targets != IGNORE
        total += torch.nn.functional.cross_entropy(logits[chosen], targets[chosen], reduction="sum")
        count += int(chosen.sum())
    slow = total / count
    for shared in (0, trainable_prefix_length(encoded)):
        fast = response_loss(model, collate(encoded, tokenizer.pad_token_id, shared))
        assert fast.item() == pytest.approx(slow.item(), rel=1e-10)


def test_prefix_never_reaches_a_response():
    from realign.calibration.encoding import IGNORE
    from realign.calibration.prefix import trainable_prefix_length

    same_prompt = [([1] * 20 + [2, 3], [IGNORE] * 20 + [2, 3]), ([1] * 20 + [2, 4], [IGNORE] * 20 + [2, 4])]
    assert trainable_prefix_length(same_prompt) == 19  # the last prompt token's logits predict the first label
    assert trainable_prefix_length([([1] * 5 + [2], [IGNORE] * 5 + [2])] * 2) == 0  # too short to pay


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_prefix_shared_generation_equals_whole_prompts(monkeypatch, architecture):
    import torch

    import realign.eval.generate as evaluate

    model, tokenizer = _system_prompt_model(torch.float32, architecture)
    prompts = ["Tell me a joke.", "How to steal a car?", "Write a poem about the sea.", "Explain gravity.", "Write malware."]
    shared, _ = evaluate.generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2)
    monkeypatch.setattr(evaluate, "MIN_SHARED_PREFIX", 10**6)
    whole, _ = evaluate.generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2)
    one_by_one = [evaluate.generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0][0] for p in prompts]
    assert shared == whole == one_by_one
    assert len(set(shared)) > 1  # the prompts lead somewhere different: the comparison can fail


@pytest.mark.parametrize("architecture, rtol", [("gpt2", 1e-12), ("llama", 1e-6)])
@pytest.mark.parametrize("stop", [False, True])
def test_prefix_shared_calibration_grams_equal_whole_rows(monkeypatch, architecture, rtol, stop):
    import torch

    import realign.calibration.grams as features
    from realign.calibration.grams import Tap, accumulate_grams, encode_calibration
    from realign.calibration.examples import Example

    model, tokenizer = _system_prompt_model(torch.float64, architecture)
    examples = [Example("Tell me a joke.", "Sure, here is the answer."), Example("Explain gravity in a few words please.", "zero one"),
                Example("Write malware.", "I'm sorry, but I cannot help with that request."), Example("Tell me a joke.", "No."),
                Example("How do magnets work, in two sentences?", "They align.")]
    calibration = encode_calibration(tokenizer, examples, 64, 512)
    assert calibration.shared_prefix() >= 20
    blocks = model.model.layers if architecture == "llama" else model.transformer.h
    first = blocks[0].mlp.down_proj if architecture == "llama" else blocks[0].mlp.c_proj
    last = blocks[-1].mlp.down_proj if architecture == "llama" else blocks[-1].mlp.c_proj
    taps = {"first.in": Tap(first, "input"), "first.out": Tap(first, "output"), "last.out": Tap(last, "output")}
    if stop:  # the pass ends after the first layer's module; its prefix cache covers the layers that ran
        taps, stop_after = {k: v for k, v in taps.items() if k.startswith("first")}, first
    else:
        stop_after = None
    whole = accumulate_grams(model, calibration, taps, 2, stop_after=stop_after, share_prefix=False)
    caches, prefix_cache = [], features.prefix_cache
    monkeypatch.setattr(features, "prefix_cache", lambda *a: caches.append(prefix_cache(*a)) or caches[-1])
    seen = []
    fast = accumulate_grams(model, calibration, taps, 2, stop_after=stop_after, on_batch=seen.append)
    assert sum(seen) == len(examples)
    assert len(caches) == 1 and caches[0] is not None  # the shared path ran
    monkeypatch.setattr(features, "prefix_cache", lambda *a: None)  # a model that fills no cache
    fallback = accumulate_grams(model, calibration, taps, 2, stop_after=stop_after)
    for name in taps:
        assert whole[name].abs().max() > 0
        assert (fast[name] - whole[name]).abs().max() <= rtol * whole[name].abs().max(), name
        assert torch.equal(fallback[name], whole[name])


def test_the_cache_goes_by_the_installed_transformers_name():
    """transformers 5.24 renamed `past_key_values` to `cache`; the old name still works there
    but warns on every call (and goes in 5.40). Every shared-prefix path uses the model's name."""
    import inspect
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    import realign.eval.generate as evaluate
    from realign.calibration.grams import Tap, accumulate_grams, encode_calibration
    from realign.calibration.kv_cache import cache_argument
    from realign.calibration.encoding import collate, encode
    from realign.calibration.examples import Example
    from realign.calibration.prefix import trainable_prefix_length
    from realign.training import response_loss

    model, tokenizer = _system_prompt_model(torch.float32)
    name = cache_argument(model)
    assert name in inspect.signature(type(model).forward).parameters
    examples = [Example("Tell me a joke.", "Sure, here is the answer."), Example("Write malware.", "I'm sorry, I cannot.")]
    encoded = [encode(tokenizer, e, 512) for e in examples]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate.generate(model, tokenizer, ["Tell me a joke.", "Write malware."], max_new_tokens=4, batch_size=2)
        response_loss(model, collate(encoded, tokenizer.pad_token_id, trainable_prefix_length(encoded))).backward()
        accumulate_grams(model, encode_calibration(tokenizer, examples, 16, 512), {"x": Tap(model.model.layers[0].mlp.down_proj, "input")}, 2)
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
        assert cache_argument(peft_model) == name  # a PeftModel forwards **kwargs to the model it wraps
        evaluate.generate(peft_model, tokenizer, ["Tell me a joke."], max_new_tokens=4, batch_size=1)
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]


def test_packed_blocks_cut_the_token_stream_and_the_full_loss_is_the_models_own():
    import torch

    from realign.errors import RealignError
    from realign.calibration.encoding import collate, encode_parts
    from realign.calibration.examples import Example
    from realign.training import pack_blocks, response_loss

    model, tokenizer = _system_prompt_model(torch.float64)
    examples = [Example("Tell me a joke.", "Sure, here is the answer."), Example("Explain gravity in a few words please.", "zero one"),
                Example("Write malware.", "No."), Example("How do magnets work?", "They align with fields.")]
    stream = [t for e in examples for part in encode_parts(tokenizer, e) for t in part]
    blocks = pack_blocks(tokenizer, examples, 16)
    assert len(blocks) == len(stream) // 16 >= 3
    assert [t for ids, _ in blocks for t in ids] == stream[: 16 * len(blocks)]  # in order, the remainder dropped
    assert all(ids == labels and len(ids) == 16 for ids, labels in blocks)  # labels on every token
    # the slow formula: each block alone, every token but the first predicted from all logits
    # (float64 here; the model's own loss would compute in float32)
    slow = sum(torch.nn.functional.cross_entropy(model(input_ids=torch.tensor([ids])).logits[0, :-1], torch.tensor(ids[1:]),
                                                 reduction="sum") for ids, _ in blocks) / (15 * len(blocks))
    fast = response_loss(model, collate(blocks, tokenizer.pad_token_id))
    assert fast.item() == pytest.approx(slow.item(), rel=1e-10)
    with pytest.raises(RealignError, match="fewer than one block"):
        pack_blocks(tokenizer, examples[:1], 10**4)


def test_scheduled_lr():
    from realign.training import scheduled_lr

    assert [scheduled_lr(1.0, s, 4, "constant") for s in range(4)] == [1.0] * 4
    assert [scheduled_lr(2.0, s, 4, "linear") for s in range(4)] == [2.0, 1.5, 1.0, 0.5]  # HF's linear decay, no warm-up
