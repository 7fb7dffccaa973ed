"""SaLoRA (Li et al., ICLR 2025): a fixed safety module computed from safety data keeps LoRA
updates out of the aligned model's safety subspace, and a task-specific initialisation starts
them where the task lives.

math.py holds the formulas; the stages are module.py -> init.py -> train.py (with layer.py, the
training layer) -> export.py, which also holds the post-hoc `apply`.
"""

from ..base import Method, register

register(Method(
    name="salora",
    title="SaLoRA",
    summary="train a LoRA with a fixed safety module that keeps its updates out of the aligned model's safety subspace",
    reference="Li et al., SaLoRA: Safety-Alignment Preserved Low-Rank Adaptation, ICLR 2025",
    inputs=("aligned", "safety_data", "task_data"),
    entry=None,  # a training pipeline: module -> init -> train -> export
    stages={"module": "realign.methods.salora.module:module", "init": "realign.methods.salora.init:init",
            "train": "realign.methods.salora.train:train", "export": "realign.methods.salora.export:export",
            "apply": "realign.methods.salora.export:apply"},
    data_free=False,
))
