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
    help={"tau": "Merge the modules whose Safe LoRA similarity is below TAU.", "task_weight": "Weight of T in a merged module.",
          "safety_weight": "Weight of S in a merged module.",
          "adapter": "The fine-tuned PEFT LoRA adapter on ALIGNED (or --finetuned).",
          "finetuned": "Or: a full fine-tuned checkpoint of ALIGNED (T = W_finetuned - W_aligned on every linear layer).",
          "as_adapter": "When the merge is dense (S dense, or --finetuned): write a truncated-SVD adapter instead of a checkpoint.",
          "adapter_rank": "Rank R of the --as-adapter LoRA."},
))
