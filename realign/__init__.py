"""realign: post-hoc safety realignment of fine-tuned LLMs (Safe LoRA, NLSR, SaLoRA).

The public API mirrors the command line, one function per command, each with an explicit
signature and a docstring:

    import realign
    report = realign.safelora("base", "aligned", "adapter", "out", top_k=10)

Every function returns a `Report` and raises `RealignError` on input a user can fix, before
anything is written. Names are imported on first use, so `import realign` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> (module, attribute)
_API = {
    "RealignError": ("realign.errors", "RealignError"),
    "Report": ("realign.report", "Report"),
    "safelora": ("realign.methods.safelora.adapter", "safelora"),
    "safelora_full": ("realign.methods.safelora.full", "safelora_full"),
    "nlsr": ("realign.methods.nlsr.oneshot", "nlsr"),
    "nlsr_amplify": ("realign.methods.nlsr.amplify", "amplify"),
    "nlsr_regions": ("realign.methods.nlsr.regions", "regions"),
    "nlsr_regions_at": ("realign.methods.nlsr.regions", "regions_at"),
    "nlsr_patch": ("realign.methods.nlsr.patch", "patch"),
    "salora_module": ("realign.methods.salora.module", "module"),
    "salora_narrow_module": ("realign.methods.salora.module", "narrow_module"),
    "salora_init": ("realign.methods.salora.init", "init"),
    "salora_train": ("realign.methods.salora.train", "train"),
    "salora_export": ("realign.methods.salora.export", "export"),
    "salora_apply": ("realign.methods.salora.export", "apply"),
    "scale": ("realign.methods.scale.run", "scale"),
    "resta": ("realign.methods.resta.run", "resta"),
    "safemerge": ("realign.methods.safemerge.run", "safemerge"),
    "repair": ("realign.search.run", "repair"),
    "audit": ("realign.drift.gate", "audit"),
    "AuditPolicy": ("realign.drift.gate", "Policy"),
    "evaluate": ("realign.eval.run", "evaluate"),
    "load_for_eval": ("realign.eval.run", "load"),
    "Endpoint": ("realign.eval.endpoint", "Endpoint"),
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from .drift.gate import Policy as AuditPolicy
    from .drift.gate import audit
    from .errors import RealignError
    from .eval.endpoint import Endpoint
    from .eval.run import evaluate
    from .eval.run import load as load_for_eval
    from .methods.nlsr.amplify import amplify as nlsr_amplify
    from .methods.nlsr.oneshot import nlsr
    from .methods.nlsr.patch import patch as nlsr_patch
    from .methods.nlsr.regions import regions as nlsr_regions
    from .methods.nlsr.regions import regions_at as nlsr_regions_at
    from .methods.safelora.adapter import safelora
    from .methods.safelora.full import safelora_full
    from .methods.salora.export import apply as salora_apply
    from .methods.salora.export import export as salora_export
    from .methods.salora.init import init as salora_init
    from .methods.salora.module import module as salora_module
    from .methods.salora.module import narrow_module as salora_narrow_module
    from .methods.salora.train import train as salora_train
    from .methods.resta.run import resta
    from .methods.safemerge.run import safemerge
    from .methods.scale.run import scale
    from .search.run import repair
    from .report import Report


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'realign' has no attribute '{name}'")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
