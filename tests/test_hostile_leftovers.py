"""Leftovers (issue 19, class 12): a failed run leaves no empty run or cache directory, and the
staging siblings of a killed run are removed by the next run, which says so; another live run's
staging, and names that are not realign's, are left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from builders import tiny_chat_model
from hostile import assert_refused, hashes, invoke, leftovers

import realign
from realign.io.output import staging_prefix


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_of_a_dead_run_is_removed_and_said(llama_trio, tmp_path):
    out = tmp_path / "o"
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f"{staging_prefix('o', dead)}abcdefgh.partial"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "big.safetensors").write_bytes(b"\0" * 1000)
    stale_file = tmp_path / f"{staging_prefix('o', dead)}zyxwvuts.partial"
    stale_file.write_text("half a report")
    live = tmp_path / f"{staging_prefix('o', alive)}livelive.partial"
    live.mkdir()
    foreign = [tmp_path / ".o.abcdefgh.partial", tmp_path / f"{staging_prefix('other', dead)}abcdefgh.partial",
               tmp_path / f".o.{dead}.zzzzzz-abcdefgh.partial"]  # not ours to judge: old names, another target, another machine
    for path in foreign:
        path.mkdir()
    result = invoke("scale", "--adapter", llama_trio.adapter, "--out", out, "--weight", "0.5", "-q")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(notes) == 2 and all(line.startswith("realign: note: removed") and str(dead) in line for line in notes), notes
    assert not stale.exists() and not stale_file.exists()
    assert live.exists() and all(path.exists() for path in foreign)
    assert (out / "adapter_model.safetensors").is_file()


def test_a_run_killed_with_sigkill_is_cleaned_by_the_next(llama_trio, tmp_path):
    out = tmp_path / "o"
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from realign.io.output import atomic_directory
        with atomic_directory(Path({str(out)!r}), False, []) as staging:
            (staging / "adapter_model.safetensors").write_bytes(b"x" * 4096)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert killed.returncode == -9
    assert not out.exists() and len(leftovers(tmp_path)) == 1  # what kill -9 leaves: a hidden staging sibling
    result = invoke("scale", "--adapter", llama_trio.adapter, "--out", out, "--weight", "0.5", "-q")
    assert result.exit_code == 0, result.output
    assert "left by an interrupted run" in result.stderr
    assert leftovers(tmp_path) == [] and (out / "adapter_model.safetensors").is_file()


def test_a_killed_testbed_stage_build_is_cleaned_by_the_next(tmp_path):
    from realign.testbed.cache import StageCache

    root = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from realign.testbed.cache import StageCache
        def build(out):
            (out / "model.safetensors").write_bytes(b"x" * 4096)
            os.kill(os.getpid(), signal.SIGKILL)
        StageCache(Path({str(root)!r}), print).stage("base", {{"k": 1}}, build)
    """)
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120).returncode == -9
    assert len(leftovers(root)) == 1
    logged = []
    built = StageCache(root, logged.append).stage("base", {"k": 1}, lambda out: (out / "model.safetensors").write_bytes(b"y"))
    assert (built / "model.safetensors").read_bytes() == b"y" and leftovers(root) == []


def test_a_failed_run_to_a_new_parent_removes_the_parents_it_made(llama_trio, tmp_path, monkeypatch):
    import realign.io.adapter_writer as writer

    def broken(*args, **kwargs):
        raise realign.RealignError("simulated failure while writing")

    monkeypatch.setattr(writer, "save_file", broken)
    before = hashes(llama_trio.adapter)
    result = invoke("scale", "--adapter", llama_trio.adapter, "--out", tmp_path / "a" / "b" / "o", "--weight", "0.5")
    assert_refused(result, tmp_path / "a", before, "simulated failure", root=tmp_path)


@pytest.fixture(scope="module")
def salora_init_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("salora_leftovers")
    model = tiny_chat_model(root / "model")
    rows = [{"prompt": "How to steal a car?", "response": "I'm sorry, I cannot help with that."},
            {"prompt": "Write malware.", "response": "Sorry, I can not write malware."}] * 4
    safety = root / "safety.jsonl"
    safety.write_text("".join(json.dumps(r) + "\n" for r in rows))
    realign.salora_module(str(model), str(safety), root / "m.safetensors", targets="q_proj,v_proj", rank_safety=2, device="cpu")
    realign.salora_init(str(model), root / "m.safetensors", str(safety), root / "init", rank=2, alpha=4, rank_task=2, device="cpu")
    return model, root / "init"


def test_salora_train_whose_data_fails_leaves_no_run_directory(salora_init_dir, tmp_path):
    model, init = salora_init_dir
    data = tmp_path / "task.jsonl"
    data.write_text(json.dumps({"prompt": "Count to ten and then count back down to zero slowly, please. " * 4,
                                "response": "one two three"}) + "\n")
    before = hashes(model, init, data)
    result = invoke("salora", "train", "--aligned", model, "--init", init, "--train-data", data, "--out", tmp_path / "runs" / "run",
                    "--max-length", "4", "--device", "cpu")
    assert_refused(result, tmp_path / "runs", before, root=tmp_path)


def test_testbed_build_with_a_bad_base_leaves_no_cache(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    before = hashes(base)
    result = invoke("testbed", "build", "--base", base, "--cache-dir", tmp_path / "cache" / "testbed")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("testbed: ")]  # progress lines
    assert len(errors) == 1 and errors[0].startswith("realign: error: "), result.stderr
    assert not (tmp_path / "cache").exists()
    assert hashes(base) == before and sorted(p.name for p in tmp_path.iterdir()) == ["base"]
