"""SafeMERGE: merge the safety delta into the modules whose update strays from it.

math.py holds the rule and the paper's defaults; run.py the merge, through methods/merging.py.
"""

from ..base import Method, register

register(Method(
    name="safemerge",
    title="SafeMERGE",
    summary="merge the safety delta into the modules whose update strays from it (Safe LoRA similarity below tau)",
    reference="Djuhera et al., SafeMERGE: Preserving Safety Alignment in Fine-Tuned Large Language Models via Selective "
              "Layer-Wise Model Merging, 2025",
    inputs=("base", "aligned", "adapter"),
    entry="realign.methods.safemerge.run:safemerge",
    planner="realign.methods.safemerge.run:plan_safemerge",
    auto_cli=True,
))
