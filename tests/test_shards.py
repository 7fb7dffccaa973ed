"""A patched copy of a safetensors checkpoint (realign/io/shards.py): the tensors a patch writes
are left out of the copy and written once; the result must be the bytes of copying everything
and writing over it."""

import filecmp

import torch
from builders import save, tiny_model

from realign.io.checkpoint import Checkpoint
from realign.io.shards import copy_checkpoint, write_over


def test_copy_with_holes_then_write_over_equals_copy_then_write_over(tmp_path):
    source = save(tiny_model("llama", seed=0).to(torch.bfloat16), tmp_path / "model", sharded=True)
    checkpoint = Checkpoint(source, "target")
    keys = sorted(checkpoint.keys())
    assert len(checkpoint.files()) >= 2
    # weights in several shards: the first and last tensor of a file, neighbours, a lone one
    chosen = [k for i, k in enumerate(keys) if i % 3 == 0 or i == len(keys) - 1]
    assert len({checkpoint.file_of(k) for k in chosen}) > 1
    g = torch.Generator().manual_seed(1)
    new = {k: torch.randn(checkpoint.read(k).shape, generator=g) for k in chosen}
    for name, left_out in (("full", ()), ("holes", chosen)):
        (tmp_path / name).mkdir()
        copy_checkpoint(checkpoint, tmp_path / name, left_out=left_out)
        for key in chosen:
            write_over(checkpoint, tmp_path / name, key, new[key])
    files = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "holes").iterdir())
    for file in files:
        assert filecmp.cmp(tmp_path / "full" / file, tmp_path / "holes" / file, shallow=False), file
    written = Checkpoint(tmp_path / "holes", "written")
    for key in keys:
        want = new[key].to(torch.bfloat16) if key in new else checkpoint.read(key)
        assert torch.equal(written.read(key), want), key


def test_a_hole_left_unwritten_reads_as_zeros_and_the_rest_is_copied(tmp_path):
    """What `write_checkpoint` guards against (it checks every planned weight was written)."""
    source = save(tiny_model("llama", seed=0), tmp_path / "model", sharded=False)
    checkpoint = Checkpoint(source, "target")
    key = sorted(checkpoint.keys())[1]
    (tmp_path / "out").mkdir()
    copy_checkpoint(checkpoint, tmp_path / "out", left_out=[key])
    copy = Checkpoint(tmp_path / "out", "copy")
    assert not copy.read(key).any()
    assert all(torch.equal(copy.read(k), checkpoint.read(k)) for k in checkpoint.keys() if k != key)
