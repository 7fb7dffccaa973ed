"""Safe LoRA (Hsu et al., NeurIPS 2024): project each LoRA update onto the alignment direction
V = W_aligned - W_base in the modules where it strays from it. Training-free and data-free.

math.py holds the formulas as pure tensor functions; adapter.py runs them on a PEFT adapter,
full.py on a full fine-tuned checkpoint; settings.py checks and reports the user's choices.
"""

from ..base import Method, register

register(Method(
    name="safelora",
    title="Safe LoRA",
    summary="project the fine-tuned update onto the alignment subspace in the modules where it strays from it",
    reference="Hsu et al., Safe LoRA: the Silver Lining of Reducing Safety Risks when Fine-tuning Large Language Models, NeurIPS 2024",
    inputs=("base", "aligned", "adapter"),
    entry="realign.methods.safelora.adapter:safelora",
    planner="realign.methods.safelora.adapter:plan_safelora",
    stages={"full": "realign.methods.safelora.full:safelora_full"},
))
