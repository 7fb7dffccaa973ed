"""The real-model testbed: base -> aligned -> fine-tuned (attacked) SmolLM2, deterministic and cached
(stages.py builds it; tasks.py holds its data; cache.py its stage folders)."""
