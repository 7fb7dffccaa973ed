"""Safe LoRA (Hsu et al., NeurIPS 2024): project each LoRA update onto the alignment direction
V = W_aligned - W_base in the modules where it strays from it. Training-free and data-free.

math.py holds the formulas as pure tensor functions; adapter.py runs them on a PEFT adapter,
full.py on a full fine-tuned checkpoint; settings.py checks and reports the user's choices.
"""
