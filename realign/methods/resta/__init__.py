"""RESTA: re-add the safety vector to the fine-tuned model, T' = a T + b S (task arithmetic).

math.py holds DARE; run.py the merge, through methods/merging.py's writers and the patch driver.
"""

from ..base import Method, register

register(Method(
    name="resta",
    title="RESTA",
    summary="add the safety vector back: T' = task_weight * T + safety_weight * S (optionally DARE on S)",
    reference="Bhardwaj et al., Language Models are Homer Simpson! Safety Re-Alignment of Fine-tuned Language Models "
              "through Task Arithmetic, ACL 2024",
    inputs=("base", "aligned", "adapter"),
    entry="realign.methods.resta.run:resta",
    planner="realign.methods.resta.run:plan_resta",
    auto_cli=True,
    help={"safety_weight": "b: weight of the safety vector S.", "task_weight": "a: weight of the fine-tuned update T.",
          "safety_vector": "The unaligned model (checkpoint, S = W_aligned - it), or an adapter on ALIGNED that un-aligns it "
                           "(S = minus its update) [default: S = W_aligned - W_base].",
          "dare": "DARE on S: drop each entry with this probability, rescale the rest.", "seed": "Seed of DARE's masks.",
          "adapter": "The fine-tuned PEFT LoRA adapter on ALIGNED (or --finetuned).",
          "finetuned": "Or: a full fine-tuned checkpoint of ALIGNED (T = W_finetuned - W_aligned on every linear layer).",
          "as_adapter": "When the merge is dense (S dense, or --finetuned): write a truncated-SVD adapter instead of a checkpoint.",
          "adapter_rank": "Rank R of the --as-adapter LoRA."},
))
