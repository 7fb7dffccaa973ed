"""Issue 19: a seeded fuzz of the files a user hands realign: safetensors headers (adapter and a
base shard), the shard index and the adapter config. Every mutated run of `realign safelora`
must exit 0 or 2 (never a traceback or another code), say at most one line on stderr when it
fails, leave nothing at --out when it fails, and leave every input byte-identical."""

import json
import random
import shutil
import struct

import pytest
from builders import copy_trio
from refusal import digest, invoke

SEED = 19
CASES = 100  # per target: 400 runs in all

VALUES = [None, True, False, 0, -1, 1, 3, 2**64, -(2**63) - 1, 1e999, -1e999, float("nan"), 0.5, "", "abc", "\ud800",
          "[", ".*", "(", "q_proj", "model.safetensors", "../x", "/etc/passwd", [], [1, 2], {}, {"a": 1}, {"q_proj": 4},
          {"(": 1}, {"q_proj": "x"}, [[[[[[]]]]]]]


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=True)  # NaN/Infinity tokens and \ud800 escapes stay in the text


def _flip(data: bytes, rng: random.Random, start: int, end: int, n: int) -> bytes:
    data = bytearray(data)
    for _ in range(n):
        i = rng.randrange(start, max(start + 1, min(end, len(data))))
        data[i] = rng.randrange(256)
    return bytes(data)


def mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    kind = rng.randrange(6)
    if kind == 0:  # the declared header length
        return struct.pack("<Q", rng.choice([0, 1, length - 1, length + 1, length + 100, 2**40, 2**64 - 1])) + data[8:]
    if kind == 1:  # random bytes inside the header text
        return _flip(data, rng, 8, 8 + length, rng.randint(1, 4))
    if kind == 2:  # cut the file short
        return data[: rng.randrange(0, len(data))]
    key = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[key]
    if kind == 3:
        entry["dtype"] = rng.choice(["I8", "U8", "BOOL", "F8_E4M3", "F64", "I64", "XX", 5, None])
    elif kind == 4:
        entry["shape"] = rng.choice([[], [0], [-1, 4], [4], [2**40, 2**40], entry["shape"][::-1], "4x4", [1.5, 2], None])
    else:
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, start], [start, end + 8], [0, 2**50], [start], "0", [start - 1, end - 1]])
    text = _dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def mutate_json(data: bytes, rng: random.Random, path: list[str]) -> bytes:
    """Change one value at a random spot under `path` (or the root), or damage the text."""
    kind = rng.randrange(5)
    if kind == 0:
        return _flip(data, rng, 0, len(data), rng.randint(1, 3))
    if kind == 1:
        return data[: rng.randrange(len(data))]
    document = json.loads(data)
    node = document
    for key in path:
        node = node[key]
    if not isinstance(node, dict) or not node or kind == 2:
        target, key = (document, rng.choice(list(document)))
    else:
        target, key = node, rng.choice(list(node))
    if kind == 3 and rng.random() < 0.3:
        del target[key]
    else:
        target[key] = rng.choice(VALUES)
    return _dumps(document).encode()


@pytest.fixture(scope="module")
def inputs(llama_trio, tmp_path_factory):
    return copy_trio(llama_trio, tmp_path_factory.mktemp("fuzz"))


def _targets(root):
    index = json.loads((root / "base" / "model.safetensors.index.json").read_text())
    shard = root / "base" / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    config_keys = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out", "target_modules",
                   "peft_type", "use_dora", "lora_bias"]
    assert all(k in config for k in config_keys[:4])
    return {
        "adapter-safetensors": (root / "adapter" / "adapter_model.safetensors", mutate_safetensors),
        "base-shard": (shard, mutate_safetensors),
        "index": (root / "base" / "model.safetensors.index.json", lambda d, rng: mutate_json(d, rng, ["weight_map"])),
        "adapter-config": (root / "adapter" / "adapter_config.json",
                           lambda d, rng: mutate_json(_with_key(d, rng, config_keys), rng, [])),
    }


def _with_key(data: bytes, rng: random.Random, keys: list[str]) -> bytes:
    """Aim most config mutations at the values realign reads."""
    document = json.loads(data)
    document[rng.choice(keys)] = rng.choice(VALUES)
    return _dumps(document).encode() if rng.random() < 0.7 else data


@pytest.mark.parametrize("target", ["adapter-safetensors", "base-shard", "index", "adapter-config"])
def test_fuzzed_inputs_keep_the_promise(inputs, tmp_path, target):
    path, mutate = _targets(inputs)[target]
    original = path.read_bytes()
    rng = random.Random(f"{SEED}:{target}")
    outcomes = {0: 0, 2: 0}
    try:
        for case in range(CASES):
            mutated = mutate(original, rng)
            path.write_bytes(mutated)
            before = digest(inputs)
            out = tmp_path / f"out{case}"
            result = invoke("safelora", "--base", inputs / "base", "--aligned", inputs / "aligned", "--adapter", inputs / "adapter",
                            "--out", out, "--top-k", "3", "-q")
            where = f"{target} case {case}: {mutated[:120]!r}"
            assert result.exit_code in (0, 2), (where, result.exit_code, result.exception, result.stderr)
            assert "Traceback" not in result.output, where
            assert digest(inputs) == before, where
            assert path.read_bytes() == mutated, where
            if result.exit_code == 2:
                lines = [line for line in result.stderr.splitlines() if line.strip()]
                assert len(lines) == 1 and lines[0].startswith("realign: error: "), (where, result.stderr)
                assert not out.exists(), where
            else:
                assert (out / "adapter_model.safetensors").is_file(), where
                shutil.rmtree(out)
            assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], where
            outcomes[result.exit_code] += 1
    finally:
        path.write_bytes(original)
    assert outcomes[2] > CASES // 4, outcomes  # the mutations do reach the checks
