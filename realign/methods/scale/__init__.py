"""Scaling: T' = a T, the fine-tuned update shrunk towards the aligned model. The baseline every
repair is compared against; the worked example of docs/architecture.md.

math.py holds the formula; run.py runs it on an adapter through the patch driver.
"""

from ..base import Method, register

register(Method(
    name="scale",
    title="Scaling",
    summary="shrink the fine-tuned update towards the aligned model: T' = a T (the baseline every repair is compared with)",
    reference="Wortsman et al., Robust fine-tuning of zero-shot models (WiSE-FT), CVPR 2022",
    inputs=("adapter",),
    entry="realign.methods.scale.run:scale",
    planner="realign.methods.scale.run:plan_scale",
    auto_cli=True,
    help={"weight": "a in [0, 1]: 1 keeps the fine-tune, 0 removes it."},
))
