"""`realign demo`: the built-in example on the real-model testbed (`realign.demo.run`), or in
seconds on a tiny random trio with --tiny (`realign.demo.tiny`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from realign.testbed.stages import attack_config

from . import options as opt
from .output import Output

group = typer.Typer()


@group.command("demo")
def demo(
    out: Path = opt.out("Where the table goes (demo.json, demo.md).", Path("realign-demo")),
    cache_dir: Optional[Path] = opt.cache_dir("Testbed and evaluation cache"),
    tiny: bool = typer.Option(False, "--tiny", help="Seconds instead of minutes: Safe LoRA on a tiny random trio (mechanics only)."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="With --tiny: keep the generated trio here."),
    workers: Optional[int] = typer.Option(None, "--workers",
                                          help="Jobs run at once after the aligned stage, each in its own process "
                                               f"{opt.default_note('2 with two or more cores, else 1')}."),
    attack: str = opt.attack(opt.default_of(attack_config, "attack")),
    attack_steps: Optional[int] = opt.attack_steps(None, "Steps of both attacks and of SaLoRA's trainings "
                                                         f"{opt.ATTACKS_OWN} (60: the attack length of the 2026-11 tables)."),
    salora_sweep: str = typer.Option("", "--salora-sweep", metavar="R_S[,R_S...]",
                                     help="SaLoRA's r_s sweep, each point a full training (e.g. 128; about 3 minutes each)."),
    quiet: bool = opt.quiet("Print nothing but errors."),
) -> None:
    """The built-in example: testbed (SmolLM2-135M, aligned, attacked), each method, one evaluation table."""
    ui = Output(quiet, False)
    log = (lambda msg: None) if quiet else (lambda msg: ui.err.print(f"demo: {msg}", markup=False))
    if tiny:
        from realign.demo.tiny import run_demo as run_tiny

        ui.report(run_tiny(workdir, log=log), "Safe LoRA on the tiny demo trio")
        return
    from realign.demo.render import markdown
    from realign.demo.run import check_prerequisites, run_demo

    from realign.demo.settings import DemoSettings
    from realign.errors import RealignError

    try:
        ranks = tuple(int(r) for r in salora_sweep.split(",") if r.strip())
    except ValueError:
        raise RealignError(f"--salora-sweep takes r_s values separated by commas, got '{salora_sweep}'") from None
    if any(r < 1 for r in ranks):
        raise RealignError("--salora-sweep values must be at least 1")
    check_prerequisites()
    table = run_demo(cache_dir, out, log=log, workers=workers, settings=DemoSettings(salora_sweep=ranks),
                     config=attack_config(attack, attack_steps=attack_steps, nlsr_attack=True))
    if not quiet:
        sys.stdout.write(markdown(table))
        ui.err.print(f"demo: wrote {out / 'demo.json'} and {out / 'demo.md'} in {table['total_s']:.0f}s", markup=False)
