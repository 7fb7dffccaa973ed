"""SaLoRA (Li et al., ICLR 2025): a fixed safety module computed from safety data keeps LoRA
updates out of the aligned model's safety subspace, and a task-specific initialisation starts
them where the task lives.

math.py holds the formulas; the stages are module.py -> init.py -> train.py (with layer.py, the
training layer) -> export.py, which also holds the post-hoc `apply`.
"""
