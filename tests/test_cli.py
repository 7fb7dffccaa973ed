"""The command line: output modes, and every bad input ending in one line, exit 2, nothing written."""

import json
import subprocess
import sys

import pytest
import torch
from builders import add_lora, tree_digest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from realign.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def trio_args(trio):
    return ["--base", trio.base, "--aligned", trio.aligned, "--adapter", trio.adapter]


def test_json_report_on_stdout_and_adapter_written(llama_trio, tmp_path):
    result = invoke("safelora", *trio_args(llama_trio), "--out", tmp_path / "o", "--json", "--top-k", "4")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["summary"]["projected"] == 4
    assert report["output"] == str(tmp_path / "o")
    assert (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_plain_table_in_a_pipe_and_report_file(llama_trio, tmp_path):
    result = invoke("safelora", *trio_args(llama_trio), "--out", tmp_path / "o", "--report", tmp_path / "r" / "report.json")
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "module\tsimilarity\tprojected\tnote"
    assert len(lines) == 1 + 14
    assert "projected" in result.stderr and "wrote" in result.stderr
    assert json.loads((tmp_path / "r" / "report.json").read_text())["command"] == "safelora"


def test_dry_run_writes_nothing(llama_trio, tmp_path):
    result = invoke("safelora", *trio_args(llama_trio), "--out", tmp_path / "o", "--dry-run")
    assert result.exit_code == 0
    assert not (tmp_path / "o").exists()
    assert "dry run" in result.stderr
    assert invoke("safelora", *trio_args(llama_trio), "--dry-run", "--quiet").stdout == ""


def test_force_replaces_existing_output(llama_trio, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "stale.txt").write_text("old")
    result = invoke("safelora", *trio_args(llama_trio), "--out", tmp_path / "o", "--force", "-q")
    assert result.exit_code == 0
    assert not (tmp_path / "o" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_console_script_entry_point(llama_trio, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "realign.cli", "safelora", *map(str, trio_args(llama_trio)), "--dry-run", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["summary"]["modules"] == 14


@pytest.mark.parametrize("args,message", [
    (["safelora", "--base", "x"], "Missing option '--aligned'"),
    (["safelora", "--base", "b", "--aligned", "a", "--adapter", "f", "--projection", "bogus"], "--projection"),
    (["--bogus"], "No such option: --bogus"),
])
def test_usage_errors_are_one_line_and_exit_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "realign.cli", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("realign: error: ") and message in lines[0], proc.stderr


# -- the command line itself ---------------------------------------------------------------------


def _cli_commands(command=None, path=()):
    """(path, click command) for the root, every group and every command."""
    import typer

    command = command or typer.main.get_command(app)
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _cli_commands(sub, path + (name,))


def _library_defaults(target):
    """Parameter defaults of a library function, or field defaults of a library dataclass."""
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(target):
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(target) if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    return {name: p.default for name, p in inspect.signature(target).parameters.items() if p.default is not p.empty}


def test_cli_defaults_are_the_library_defaults():
    """Every option named like a parameter of the library function its command calls (or of the
    settings dataclass it fills) has that parameter's default; where several of the listed
    functions name it, the first one's (a preset's None before the dataclass it fills)."""
    import enum

    import realign
    from realign.cli.options import parse_targets
    from realign.demo.run import run_demo
    from realign.methods.nlsr.math import Selection
    from realign.methods.nlsr.regions import RegionSettings
    from realign.testbed.stages import TestbedConfig, attack_config

    library = {
        ("safelora",): (realign.safelora, realign.safelora_full),
        ("audit",): (realign.audit, realign.AuditPolicy),
        ("eval",): (realign.evaluate,),
        ("demo",): (run_demo, attack_config, TestbedConfig),
        ("salora", "module"): (realign.salora_module,),
        ("salora", "init"): (realign.salora_init,),
        ("salora", "train"): (realign.salora_train,),
        ("salora", "export"): (realign.salora_export,),
        ("salora", "apply"): (realign.salora_apply,),
        ("nlsr",): (realign.nlsr, Selection, RegionSettings),
        ("nlsr", "amplify"): (realign.nlsr_amplify,),
        ("nlsr", "regions"): (realign.nlsr_regions, RegionSettings),
        ("nlsr", "patch"): (realign.nlsr_patch, Selection),
        ("testbed", "build"): (attack_config, TestbedConfig),
        ("scale",): (realign.scale,),
        ("resta",): (realign.resta,),
        ("safemerge",): (realign.safemerge,),
        ("repair",): (realign.repair,),
    }
    # the option's name -> the library's names for the same setting
    renamed = {"amplify": ("factor", "amplify_factor"), "regions": ("mode", "regions_mode"), "selection": ("rule",),
               "module": ("module_file",), "init": ("init_dir",)}
    commands = dict(_cli_commands())
    leaves = {path for path, command in commands.items() if not hasattr(command, "commands")}
    assert leaves <= set(library), f"map these commands to the library functions they call: {leaves - set(library)}"
    for path, targets in library.items():
        params = [p for p in commands[path].params if p.expose_value and not p.required]
        compared = 0
        for param in params:
            for target in targets:
                defaults = _library_defaults(target)
                names = [name for name in (param.name, *renamed.get(param.name, ())) if name in defaults]
                for name in names:
                    cli, lib = param.default, defaults[name]
                    if isinstance(cli, enum.Enum):
                        cli = cli.value
                    if isinstance(lib, tuple) and isinstance(cli, str):  # --targets a,b
                        cli = parse_targets(cli)
                    if isinstance(lib, tuple) and isinstance(cli, list):  # repeatable options
                        cli = tuple(cli)
                    assert cli == lib, (path, param.name, target.__name__, name, cli, lib)
                    compared += 1
                if names:
                    break
        assert compared, path


def test_help_shows_flags_without_a_value_placeholder():
    """typer's rich help prints `<bool>` after every flag unless told otherwise (app.py)."""
    for path, _ in _cli_commands():
        result = invoke(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        assert "--help" in result.output and "<bool>" not in result.output, (path, result.output)
    assert "<str>" in invoke("safelora", "--help").output  # the other options keep theirs


def test_salora_train_lr_schedule(monkeypatch, tmp_path):
    import realign
    from realign.report import Report

    calls = []

    def train(aligned, init, train_data, out, **kwargs):
        calls.append(kwargs)
        return Report("salora train", {}, {}, summary={"steps": 0, "resumed_from": 0, "first_loss": None, "last_loss": None},
                      timings={"total_s": 0.0})

    args = ["salora", "train", "--aligned", "a", "--init", tmp_path, "--train-data", tmp_path / "d.jsonl", "--out", tmp_path / "run"]
    with monkeypatch.context() as patch:
        patch.setattr(realign, "salora_train", train)
        assert invoke(*args).exit_code == 0
        assert invoke(*args, "--lr-schedule", "linear", "-q").exit_code == 0
    assert [c["lr_schedule"] for c in calls] == ["constant", "linear"]
    result = invoke(*args, "--lr-schedule", "cosine")
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        "realign: error: --lr-schedule must be one of constant, linear, got 'cosine'"]


def test_importing_the_cli_stays_light():
    code = ("import sys, typer, realign.cli; assert 'torch' not in sys.modules; "
            "from realign.cli import app, main; assert isinstance(app, typer.Typer) and callable(main)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# -- bad input ---------------------------------------------------------------------------------


def _set_tensor(path, key, fn):
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    tensors[key] = fn(tensors[key])
    save_file(tensors, path, metadata=metadata)


def _shard_of(directory, key):
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return directory / index["weight_map"][key]


def _poison(value):
    def fn(t):
        t = t.clone()
        t.view(-1)[3] = value
        return t

    return fn


Q0 = "model.layers.0.self_attn.q_proj.weight"
A_Q0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _corrupt(case, root):
    """Apply one corruption to the copied inputs; return extra CLI args (or replacements)."""
    base, aligned, adapter = root / "base", root / "aligned", root / "adapter"
    if case == "nan-base":
        _set_tensor(_shard_of(base, Q0), Q0, _poison(float("nan")))
    elif case == "inf-aligned":
        _set_tensor(_shard_of(aligned, Q0), Q0, _poison(float("inf")))
    elif case == "nan-adapter":
        _set_tensor(adapter / "adapter_model.safetensors", A_Q0, _poison(float("nan")))
    elif case == "truncated-shard":
        shard = _shard_of(aligned, Q0)
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 100])
    elif case == "missing-shard":
        _shard_of(base, Q0).unlink()
    elif case == "no-counterpart":
        tensors = load_file(adapter / "adapter_model.safetensors")
        renamed = {k.replace("layers.1.mlp.up_proj", "layers.1.mlp.extra_proj"): v for k, v in tensors.items()}
        save_file(renamed, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    elif case == "shape-mismatch":
        _set_tensor(_shard_of(aligned, Q0), Q0, lambda t: torch.zeros(t.shape[0], t.shape[1] + 1))
    elif case == "bad-config":
        (adapter / "adapter_config.json").write_text("{not json")
    elif case == "quantized":
        _set_tensor(_shard_of(base, Q0), Q0, lambda t: (t * 100).to(torch.int8))
    elif case == "zero3-shard":
        tensors = load_file(adapter / "adapter_model.safetensors")
        tensors[A_Q0] = torch.zeros(0)
        save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    elif case == "rank-mismatch-config":
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["rank_pattern"] = {"q_proj": 7}
        (adapter / "adapter_config.json").write_text(json.dumps(config))


CORRUPTIONS = [
    ("nan-base", "base weight 'model.layers.0.self_attn.q_proj.weight' contains NaN or Inf"),
    ("inf-aligned", "aligned weight 'model.layers.0.self_attn.q_proj.weight' contains NaN or Inf"),
    ("nan-adapter", "lora_A.weight' contains NaN or Inf"),
    ("truncated-shard", "truncated"),
    ("missing-shard", "is missing"),
    ("no-counterpart", "'model.layers.1.mlp.extra_proj' has no weight in the base checkpoint"),
    ("shape-mismatch", "shape"),
    ("bad-config", "cannot read adapter config"),
    ("rank-mismatch-config", "says r=7"),
    ("zero3-shard", "DeepSpeed ZeRO-3"),
    ("quantized", "is not floating point"),
]


def assert_clean_failure(result, message, out, inputs_before=None, root=None):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("realign: error: ")
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), "staging directory left behind"
    if inputs_before is not None:
        assert tree_digest(root) == inputs_before


@pytest.mark.parametrize("case,message", CORRUPTIONS, ids=[c for c, _ in CORRUPTIONS])
def test_corrupt_inputs_fail_cleanly(case, message, trio_copy, tmp_path):
    _corrupt(case, trio_copy)
    before = tree_digest(trio_copy)
    out = tmp_path / "out"
    args = ["--base", trio_copy / "base", "--aligned", trio_copy / "aligned", "--adapter", trio_copy / "adapter"]
    result = invoke("safelora", *args, "--out", out)
    assert_clean_failure(result, message, out, before, trio_copy)


def test_bad_paths_fail_cleanly(llama_trio, tmp_path):
    out = tmp_path / "out"
    a = trio_args(llama_trio)
    empty = tmp_path / "empty"
    empty.mkdir()
    file = tmp_path / "file.txt"
    file.write_text("x")
    cases = [
        (["--base", tmp_path / "nope", *a[2:]], "base '" + str(tmp_path / "nope") + "' does not exist"),
        (["--base", empty, *a[2:]], "is not a model directory"),
        (["--base", file, *a[2:]], "is a file"),
        (["--base", llama_trio.adapter, *a[2:]], "is a PEFT adapter, not a model checkpoint"),
        ([*a[:4], "--adapter", llama_trio.base], "is not a PEFT adapter"),
        ([*a[:4], "--adapter", "nobody/nothing"], "neither a local directory nor a repo id"),
    ]
    for args, message in cases:
        assert_clean_failure(invoke("safelora", *args, "--out", out), message, out)


def test_bad_options_fail_cleanly(llama_trio, tmp_path):
    out = tmp_path / "out"
    a = trio_args(llama_trio)
    cases = [
        (["--top-k", "0"], "--top-k must be between 1 and 14"),
        (["--top-k", "15"], "--top-k must be between 1 and 14"),
        (["--top-k", "2", "--threshold", "0.3"], "mutually exclusive"),
        (["--projection", "exact"], "needs --rank"),
        (["--rank", "2"], "--rank applies only to --projection exact"),
        (["--projection", "exact", "--rank", "99"], "exceeds the dimension"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA device"))
    for extra, message in cases:
        assert_clean_failure(invoke("safelora", *a, "--out", out, *extra), message, out)
    assert_clean_failure(invoke("safelora", *a), "an output directory is needed (--out)", out)


def test_existing_or_overlapping_output_is_refused(llama_trio, tmp_path):
    before = tree_digest(llama_trio.adapter.parent)
    out = tmp_path / "exists"
    out.mkdir()
    result = invoke("safelora", *trio_args(llama_trio), "--out", out)
    assert result.exit_code == 2 and "already exists (use --force" in result.stderr
    for target in (llama_trio.adapter, llama_trio.adapter / "sub", llama_trio.adapter.parent):
        result = invoke("safelora", *trio_args(llama_trio), "--out", target, "--force")
        assert result.exit_code == 2 and "overlaps the input" in result.stderr
    result = invoke("safelora", *trio_args(llama_trio), "--dry-run", "--report", llama_trio.adapter / "r.json")
    assert result.exit_code == 2 and "overlaps the input" in result.stderr
    assert tree_digest(llama_trio.adapter.parent) == before


@pytest.mark.parametrize("kind", ["dora", "lora_bias"])
def test_unsupported_adapters_are_refused(kind, llama_trio, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_trio.aligned)
    options = {"use_dora": True} if kind == "dora" else {"lora_bias": True}
    add_lora(model, "llama", seed=1, **options).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    result = invoke("safelora", "--base", llama_trio.base, "--aligned", llama_trio.aligned, "--adapter", tmp_path / "adapter", "--out", out)
    assert_clean_failure(result, "DoRA" if kind == "dora" else "lora_bias", out)


def test_all_modules_without_alignment_change_is_an_error(llama_trio, tmp_path):
    out = tmp_path / "out"
    result = invoke("safelora", "--base", llama_trio.base, "--aligned", llama_trio.base, "--adapter", llama_trio.adapter, "--out", out)
    assert_clean_failure(result, "no module has a defined similarity", out)


def test_demo_runs_end_to_end(tmp_path):
    result = invoke("demo", "--tiny", "--workdir", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    assert "projected" in result.stderr
    assert (tmp_path / "demo" / "safelora-out" / "adapter_model.safetensors").exists()
    lines = result.stdout.strip().splitlines()
    assert any("\tyes\t" in line for line in lines) and any("\tno\t" in line for line in lines)


@pytest.mark.parametrize("value,message", [("x", "separated by commas"), ("128,0", "at least 1")])
def test_demo_salora_sweep_is_checked_before_anything_runs(tmp_path, value, message):
    result = invoke("demo", "--salora-sweep", value, "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
