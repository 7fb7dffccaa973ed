"""`realign audit`: the gate's exit codes, its formats, the full-checkpoint and NLSR inputs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from builders import build_nlsr_setup
from realign.cli import app
from realign.methods.safelora.adapter import safelora

runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def trio_args(trio):
    return ["--base", trio.base, "--aligned", trio.aligned, "--adapter", trio.adapter]


@pytest.fixture(scope="module")
def similarities(llama_trio):
    report = safelora(str(llama_trio.base), str(llama_trio.aligned), str(llama_trio.adapter), dry_run=True, device="cpu")
    return sorted(m["similarity"] for m in report.modules)


def test_pass_and_fail_follow_the_policy(llama_trio, similarities):
    n = len(similarities)
    cut = (similarities[2] + similarities[3]) / 2  # exactly three modules below
    passed = invoke("audit", *trio_args(llama_trio), "--min-similarity", cut, "--max-drifted", "3", "--json")
    assert passed.exit_code == 0, passed.output
    report = json.loads(passed.stdout)
    assert report["summary"]["verdict"] == "pass" and report["summary"]["drifted"] == 3
    assert [m["name"] for m in report["modules"] if m["drifted"]] == [
        m["name"] for m in report["modules"] if m["similarity"] < cut]
    failed = invoke("audit", *trio_args(llama_trio), "--min-similarity", cut, "--max-drifted", "2", "--json")
    assert failed.exit_code == 1
    assert json.loads(failed.stdout)["summary"]["verdict"] == "fail"
    # a percentage of the scored modules: 3 of n is above 3/n - a little, not above 3/n
    assert invoke("audit", *trio_args(llama_trio), "--min-similarity", cut, "--max-drifted", f"{100 * 3 / n + 0.01}%", "-q").exit_code == 0
    assert invoke("audit", *trio_args(llama_trio), "--min-similarity", cut, "--max-drifted", f"{100 * 3 / n - 0.01}%", "-q").exit_code == 1


def test_github_format_annotates_the_failing_modules(llama_trio, similarities, tmp_path):
    cut = (similarities[1] + similarities[2]) / 2
    summary = tmp_path / "summary.md"
    result = invoke("audit", *trio_args(llama_trio), "--min-similarity", cut, "--max-drifted", "0", "--format", "github",
                    env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert result.exit_code == 1
    lines = result.stdout.strip().splitlines()
    assert sum(line.startswith("::error title=realign audit: drifted module::") for line in lines) == 2
    assert lines[-1].startswith("::error title=realign audit::realign audit: FAIL: 2 of")
    text = summary.read_text()
    assert "FAIL" in text and "**Drifted modules**" in text and text.count("| `") >= 2 + len(similarities)
    markdown = invoke("audit", *trio_args(llama_trio), "--min-similarity", cut, "--format", "markdown")
    passes = 2 / len(similarities) <= 0.10  # the default --max-drifted
    assert markdown.exit_code == (0 if passes else 1)
    assert markdown.stdout.startswith("### :white_check_mark: realign audit: PASS" if passes else "### :x: realign audit: FAIL")


def test_table_in_a_pipe_and_report_file(llama_trio, tmp_path):
    result = invoke("audit", *trio_args(llama_trio), "--min-similarity", "-1", "--report", tmp_path / "r.json")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == "module\tsimilarity\tdrifted"
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["verdict"] == "pass"


@pytest.mark.parametrize("extra, message", [
    (["--max-drifted", "ten"], "--max-drifted must be a percentage"),
    (["--max-drifted", "120%"], "at most 100%"),
    (["--min-similarity", "2"], "--min-similarity must be between -1 and 1"),
    (["--masks", "m.safetensors"], "needs both --aligned-adapter"),
    (["--min-region-similarity", "0.2"], "--min-region-similarity needs --aligned-adapter"),
])
def test_bad_input_exits_2_with_one_line(llama_trio, extra, message):
    result = invoke("audit", *trio_args(llama_trio), *extra)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_both_or_neither_finetuned_input_is_bad(llama_trio, tmp_path):
    result = invoke("audit", "--base", llama_trio.base, "--aligned", llama_trio.aligned)
    assert result.exit_code == 2 and "exactly one of --adapter" in result.stderr
    result = invoke("audit", "--base", llama_trio.base, "--aligned", llama_trio.aligned, "--adapter", tmp_path / "missing")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_nlsr_region_similarity(tmp_path):
    from realign.methods.nlsr import patch as nlsr_patch
    from realign.methods.nlsr import regions as nlsr_regions

    setup = build_nlsr_setup(tmp_path)
    nlsr_regions.regions(str(setup.base), str(setup.aligned), str(setup.safety), tmp_path / "masks.safetensors", device="cpu")
    patched = nlsr_patch.patch(str(setup.aligned), tmp_path / "masks.safetensors", str(setup.fine_tuned), dry_run=True)
    result = invoke("audit", "--base", setup.base, "--aligned", setup.aligned, "--adapter", setup.fine_tuned,
                    "--aligned-adapter", setup.aligned, "--masks", tmp_path / "masks.safetensors", "--min-similarity", "-1",
                    "--min-region-similarity", "1.0", "--max-drifted", "100%", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    regions = {m["name"]: m["region_similarity"] for m in report["modules"]}
    assert regions == {m["name"]: m["similarity"] for m in patched.modules}
    assert report["summary"]["drifted"] == sum(r is not None and r < 1.0 for r in regions.values())


def test_full_checkpoint_audit_matches_adapter_audit(tmp_path):
    from builders import build_trio
    from test_safelora_full import _merged

    trio = build_trio(tmp_path, "llama", sharded=True)
    finetuned = _merged(trio.aligned, trio.adapter, tmp_path / "finetuned")
    common = ["--base", trio.base, "--aligned", trio.aligned, "--min-similarity", "0.5", "--json"]
    via_adapter = json.loads(invoke("audit", *common, "--adapter", trio.adapter).stdout)
    via_full = json.loads(invoke("audit", *common, "--finetuned", finetuned).stdout)
    assert [m["drifted"] for m in via_adapter["modules"]] == [m["drifted"] for m in via_full["modules"]]
    assert via_adapter["summary"]["verdict"] == via_full["summary"]["verdict"]
