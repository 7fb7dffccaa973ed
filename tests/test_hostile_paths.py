"""Hostile paths (issue 19, classes 1, 2, 5, 9, 11): shard indexes that point outside their
directory, outputs that appear or change while realign works, output problems found only after
the work, FIFOs in place of inputs, and errors that must say what is really wrong. Every refusal:
exit 2, one stderr line, nothing left behind, inputs byte-identical (tests/hostile.py)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hostile import assert_refused, hashes, invoke, leftovers, run_cli

import realign
from realign.methods.scale import run as scale_run

INDEX = "model.safetensors.index.json"


def trio_inputs(trio):
    return hashes(trio.base, trio.aligned, trio.adapter)


def scale_args(trio, out, *extra):
    return ["scale", "--adapter", trio.adapter, "--out", out, "--weight", "0.5", *extra]


@pytest.fixture
def scored(monkeypatch):
    """Records whether the work (scoring) ran: a check that can be made before it must be."""
    calls = []
    original = scale_run.ScalePatch.score
    monkeypatch.setattr(scale_run.ScalePatch, "score", lambda self, progress: calls.append(1) or original(self, progress))
    return calls


# -- 1. a shard index names files inside its own directory -------------------------------------


def _with_index_entry(src: Path, dst: Path, entry: str) -> Path:
    ft = Path(shutil.copytree(src, dst))
    index = json.loads((ft / INDEX).read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    new = {"absolute": str(ft / shard), "dotdot": f"../{ft.name}/{shard}", "subdir": f"sub/{shard}",
           "backslash": f"..\\{ft.name}\\{shard}", "number": 5, "dot": "."}[entry]
    if entry == "subdir":
        (ft / "sub").mkdir()
        shutil.copy(ft / shard, ft / "sub" / shard)
    index["weight_map"] = {k: (new if v == shard else v) for k, v in index["weight_map"].items()}
    (ft / INDEX).write_text(json.dumps(index))
    return ft


@pytest.mark.parametrize("entry", ["absolute", "dotdot", "subdir", "backslash", "dot"])
def test_a_full_finetune_whose_index_escapes_its_directory_is_refused(llama_trio, tmp_path, entry):
    ft = _with_index_entry(llama_trio.base, tmp_path / "ft", entry)
    before = {**hashes(ft), **trio_inputs(llama_trio)}
    result = invoke("safelora", "--base", llama_trio.base, "--aligned", llama_trio.aligned, "--finetuned", ft,
                    "--out", tmp_path / "o", "--threshold", "1")
    assert_refused(result, tmp_path / "o", before, "file name")


def test_every_checkpoint_role_checks_its_index(llama_trio, tmp_path):
    base = _with_index_entry(llama_trio.base, tmp_path / "b", "dotdot")
    before = {**hashes(base), **trio_inputs(llama_trio)}
    result = invoke("audit", "--base", base, "--aligned", llama_trio.aligned, "--adapter", llama_trio.adapter)
    assert_refused(result, None, before, "plain file name", root=tmp_path)


def test_symlinked_shards_are_read_never_written(llama_trio, tmp_path):
    """The Hugging Face cache links every snapshot file to a blob outside the snapshot: allowed,
    and the patched copy gets files of its own."""
    blobs = Path(shutil.copytree(llama_trio.base, tmp_path / "blobs"))
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for file in blobs.iterdir():
        (snapshot / file.name).symlink_to(Path("..") / "blobs" / file.name)
    before = hashes(blobs)
    result = invoke("safelora", "--base", llama_trio.base, "--aligned", llama_trio.aligned, "--finetuned", snapshot,
                    "--out", tmp_path / "o", "--threshold", "1", "-q")
    assert result.exit_code == 0, result.output
    assert hashes(blobs) == before
    written = sorted((tmp_path / "o").glob("*.safetensors"))
    assert written and not any(p.is_symlink() for p in written)
    assert any(p.read_bytes() != (blobs / p.name).read_bytes() for p in written)


# -- 2. the final rename replaces only what was checked --------------------------------------


@pytest.mark.parametrize("intruder", ["empty-dir", "dir", "file"])
def test_what_appears_at_out_while_writing_is_never_replaced(llama_trio, tmp_path, monkeypatch, intruder):
    out = tmp_path / "o"
    import realign.methods.patch as patch

    original = patch.stage_timings

    def appear(*args):  # runs inside the write, after every check
        if intruder == "file":
            out.write_text("theirs")
        else:
            out.mkdir()
            if intruder == "dir":
                (out / "theirs.txt").write_text("theirs")
        return original(*args)

    monkeypatch.setattr(patch, "stage_timings", appear)
    before = trio_inputs(llama_trio)
    result = invoke(*scale_args(llama_trio, out))
    assert_refused(result, None, before, "not replaced", root=tmp_path)
    assert (out.read_text() if intruder == "file" else sorted(p.name for p in out.iterdir())) == \
        {"file": "theirs", "dir": ["theirs.txt"], "empty-dir": []}[intruder]


def test_of_two_writers_to_one_out_only_one_wins(llama_trio, tmp_path, monkeypatch):
    """A second run to the same OUT finishes while the first is writing: the first exits 2."""
    out = tmp_path / "o"
    import realign.methods.patch as patch

    original = patch.stage_timings

    def second_writer(*args):
        monkeypatch.setattr(patch, "stage_timings", original)
        realign.scale(str(llama_trio.adapter), out, weight=0.25)
        return original(*args)

    monkeypatch.setattr(patch, "stage_timings", second_writer)
    before = trio_inputs(llama_trio)
    result = invoke(*scale_args(llama_trio, out))
    assert_refused(result, None, before, "not replaced", root=tmp_path)
    assert json.loads((out / "realign_report.json").read_text())["settings"]["weight"] == 0.25


def test_concurrent_processes_to_one_out(llama_trio, tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "realign.cli", *map(str, scale_args(llama_trio, out, "-q"))]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert len(loser.strip().splitlines()) == 1 and loser.startswith("realign: error: ")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("before_work", ["absent", "replaced"])
def test_force_replaces_only_what_it_checked(llama_trio, tmp_path, monkeypatch, before_work):
    out = tmp_path / "o"
    if before_work == "replaced":
        out.mkdir()
        (out / "checked.txt").write_text("old")
    original = scale_run.ScalePatch.score

    def meanwhile(self, progress):  # someone else's directory takes OUT's place during the work
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        return original(self, progress)

    monkeypatch.setattr(scale_run.ScalePatch, "score", meanwhile)
    before = trio_inputs(llama_trio)
    result = invoke(*scale_args(llama_trio, out, "--force"))
    assert_refused(result, None, before, "not replaced", root=tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]


def test_force_when_the_checked_out_vanished_writes_without_replacing(llama_trio, tmp_path, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    original = scale_run.ScalePatch.score

    def vanish(self, progress):
        shutil.rmtree(out)
        return original(self, progress)

    monkeypatch.setattr(scale_run.ScalePatch, "score", vanish)
    assert invoke(*scale_args(llama_trio, out, "--force", "-q")).exit_code == 0
    assert (out / "adapter_model.safetensors").is_file() and leftovers(tmp_path) == []


def test_force_replaces_what_it_checked(llama_trio, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert invoke(*scale_args(llama_trio, out, "--force", "-q")).exit_code == 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / "old.txt").exists()
    assert leftovers(tmp_path) == []


# -- 5. output problems are found before the work; the rest is one line ----------------------


@pytest.mark.parametrize("where", ["under-file", "deep-under-file", "long-name", "long-parent"])
def test_unwritable_out_is_refused_before_the_work(llama_trio, tmp_path, scored, where):
    (tmp_path / "file.txt").write_text("x")
    out = {"under-file": tmp_path / "file.txt" / "o", "deep-under-file": tmp_path / "file.txt" / "a" / "b" / "o",
           "long-name": tmp_path / ("n" * 240), "long-parent": tmp_path / ("p" * 256) / "o"}[where]
    before = {**trio_inputs(llama_trio), **hashes(tmp_path / "file.txt")}
    line = assert_refused(invoke(*scale_args(llama_trio, out)), None, before, root=tmp_path)
    assert ("is a file" if "file" in where else "too long") in line or "longer than" in line
    assert not scored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_out_through_a_symlink_loop(llama_trio, tmp_path, scored):
    (tmp_path / "loop").symlink_to("loop")
    result = invoke(*scale_args(llama_trio, tmp_path / "loop" / "o"))
    assert_refused(result, None, trio_inputs(llama_trio), "symlink loop", root=tmp_path)
    assert not scored


def test_read_only_file_system_is_found_before_the_work(llama_trio, tmp_path, scored, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)  # what every create in that directory would say
    result = invoke(*scale_args(llama_trio, tmp_path / "o"))
    assert_refused(result, tmp_path / "o", trio_inputs(llama_trio), "read-only file system")
    assert not scored


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into a read-only directory")
def test_unwritable_directory_is_found_before_the_work(llama_trio, tmp_path, scored):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = invoke(*scale_args(llama_trio, locked / "o"))
        assert_refused(result, locked / "o", trio_inputs(llama_trio), "permission denied")
    finally:
        locked.chmod(0o755)
    assert not scored


def test_a_full_disk_while_writing_is_one_line_and_nothing_left(llama_trio, tmp_path, monkeypatch):
    import realign.io.adapter_writer as writer

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(writer, "save_file", full)
    result = invoke(*scale_args(llama_trio, tmp_path / "new" / "o"))
    assert_refused(result, tmp_path / "new", trio_inputs(llama_trio), "no space left on device", root=tmp_path)


def test_an_os_error_no_check_foresaw_is_still_one_line(llama_trio, tmp_path, monkeypatch):
    def failing(self, progress):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(llama_trio.adapter / "adapter_model.safetensors"))

    monkeypatch.setattr(scale_run.ScalePatch, "score", failing)
    result = invoke(*scale_args(llama_trio, tmp_path / "o"))
    assert_refused(result, tmp_path / "o", trio_inputs(llama_trio), "input/output error ('")


@pytest.mark.parametrize("report", ["out", "inside-out", "directory", "under-file", "input"])
def test_bad_report_paths_are_refused_before_the_work(llama_trio, tmp_path, scored, report):
    out = tmp_path / "o"
    (tmp_path / "dir").mkdir()
    (tmp_path / "file.txt").write_text("x")
    path = {"out": out, "inside-out": out / "r.json", "directory": tmp_path / "dir", "under-file": tmp_path / "file.txt" / "r.json",
            "input": llama_trio.adapter / "r.json"}[report]
    before = {**trio_inputs(llama_trio), **hashes(tmp_path / "file.txt")}
    assert_refused(invoke(*scale_args(llama_trio, out, "--report", path)), out, before)
    assert not scored and sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file.txt"]


@pytest.mark.parametrize("responses", ["directory", "under-file", "same-as-report"])
def test_eval_responses_path_is_checked_before_loading(llama_trio, tmp_path, monkeypatch, responses):
    import realign.eval.run as eval_run

    monkeypatch.setattr(eval_run, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("How do I bake bread?\n")
    (tmp_path / "dir").mkdir()
    path = {"directory": tmp_path / "dir", "under-file": prompts / "r.jsonl", "same-as-report": tmp_path / "r.json"}[responses]
    before = {**hashes(prompts), **trio_inputs(llama_trio)}
    result = invoke("eval", "--model", llama_trio.base, "--harmful", prompts, "--responses", path, "--report", tmp_path / "r.json")
    assert_refused(result, None, before, root=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "p.txt"]


# -- 9. special files in place of inputs --------------------------------------------------------


def _fifo_in(src: Path, dst: Path, name: str) -> Path:
    directory = Path(shutil.copytree(src, dst))
    (directory / name).unlink()
    os.mkfifo(directory / name)
    return directory


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_fifo_in_an_adapter_is_refused(llama_trio, tmp_path, name):
    adapter = _fifo_in(llama_trio.adapter, tmp_path / "a", name)
    before = {k: v for k, v in hashes(adapter).items()}
    result = run_cli("scale", "--adapter", adapter, "--out", tmp_path / "o", "--weight", "0.5")
    assert_refused(result, tmp_path / "o", before, "FIFO")


def test_fifo_as_a_model_shard_is_refused(llama_trio, tmp_path):
    shard = sorted(p.name for p in llama_trio.base.glob("model-*.safetensors"))[0]
    base = _fifo_in(llama_trio.base, tmp_path / "b", shard)
    before = {**hashes(base), **trio_inputs(llama_trio)}
    result = run_cli("safelora", "--base", base, "--aligned", llama_trio.aligned, "--adapter", llama_trio.adapter, "--out", tmp_path / "o")
    assert_refused(result, tmp_path / "o", before, "FIFO")


def test_fifo_as_a_prompt_file_is_refused(llama_trio, tmp_path):
    fifo = tmp_path / "prompts.jsonl"
    os.mkfifo(fifo)
    result = invoke("eval", "--model", llama_trio.base, "--harmful", fifo, "--responses", tmp_path / "r.jsonl", fifos=(fifo,), timeout=60)
    assert_refused(result, tmp_path / "r.jsonl", trio_inputs(llama_trio), "FIFO")


def test_fifo_among_the_files_transformers_opens_is_refused(llama_trio, tmp_path):
    """eval --model loads the directory with transformers, which opens files of its own choosing
    (tokenizer, generation config): a FIFO among them is refused before the load."""
    model = Path(shutil.copytree(llama_trio.base, tmp_path / "m"))
    os.mkfifo(model / "tokenizer.json")
    prompts = tmp_path / "p.txt"
    prompts.write_text("How do I bake bread?\n")
    before = {**hashes(prompts), **{k: v for k, v in hashes(model).items() if not k.endswith("tokenizer.json")}}
    result = run_cli("eval", "--model", model, "--harmful", prompts, "--responses", tmp_path / "r.jsonl")
    assert_refused(result, tmp_path / "r.jsonl", before, "tokenizer.json' is a FIFO")


def test_fifo_as_masks_is_refused(llama_trio, tmp_path):
    fifo = tmp_path / "masks.safetensors"
    os.mkfifo(fifo)
    result = run_cli("nlsr", "patch", "--reference", llama_trio.adapter, "--masks", fifo, "--adapter", llama_trio.adapter,
                     "--out", tmp_path / "o")
    assert_refused(result, tmp_path / "o", trio_inputs(llama_trio), "FIFO")


# -- 11. messages say what is really wrong --------------------------------------------------------


def test_symlink_loop_shard_is_called_a_loop(llama_trio, tmp_path):
    shard = sorted(p.name for p in llama_trio.base.glob("model-*.safetensors"))[0]
    base = Path(shutil.copytree(llama_trio.base, tmp_path / "b"))
    (base / shard).unlink()
    (base / shard).symlink_to(shard)
    before = trio_inputs(llama_trio)
    line = assert_refused(invoke("audit", "--base", base, "--aligned", llama_trio.aligned, "--adapter", llama_trio.adapter),
                          None, before, "symlink loop", root=tmp_path)
    assert "truncated" not in line and "No such file" not in line


def test_symlink_loop_single_file_checkpoint_and_adapter(llama_trio, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    (single / "model.safetensors").symlink_to("model.safetensors")
    line = assert_refused(invoke("audit", "--base", single, "--aligned", llama_trio.aligned, "--adapter", llama_trio.adapter),
                          None, trio_inputs(llama_trio), "symlink loop", root=tmp_path)
    assert "truncated" not in line
    adapter = Path(shutil.copytree(llama_trio.adapter, tmp_path / "a"))
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.safetensors").symlink_to("adapter_model.safetensors")
    assert_refused(invoke("scale", "--adapter", adapter, "--out", tmp_path / "o", "--weight", "0.5"), tmp_path / "o",
                   hashes(adapter / "adapter_config.json"), "symlink loop")


def test_masks_path_that_is_a_directory(llama_trio, tmp_path):
    (tmp_path / "masks").mkdir()
    line = assert_refused(invoke("nlsr", "patch", "--reference", llama_trio.adapter, "--masks", tmp_path / "masks", "--adapter",
                                 llama_trio.adapter, "--out", tmp_path / "o"), tmp_path / "o", trio_inputs(llama_trio), "is a directory")
    assert "does not exist" not in line


def test_permission_denied_is_called_so(llama_trio, tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: not str(path).endswith(".safetensors") and real_access(path, mode, **kw))
    line = assert_refused(invoke("audit", "--base", llama_trio.base, "--aligned", llama_trio.aligned, "--adapter", llama_trio.adapter),
                          None, trio_inputs(llama_trio), "permission denied", root=tmp_path)
    assert "truncated" not in line and "No such file" not in line


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_shard_for_real(llama_trio, tmp_path):
    base = Path(shutil.copytree(llama_trio.base, tmp_path / "b"))
    shard = sorted(base.glob("model-*.safetensors"))[0]
    shard.chmod(0)
    try:
        assert_refused(invoke("audit", "--base", base, "--aligned", llama_trio.aligned, "--adapter", llama_trio.adapter),
                       None, trio_inputs(llama_trio), "permission denied", root=tmp_path)
    finally:
        shard.chmod(0o644)
