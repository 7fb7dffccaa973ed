"""`realign audit`: the weight-only safety-drift gate (gate.py) and its renderings (render.py)."""
