"""`realign audit`: the weight-only safety-drift gate (gate.py) and its renderings (render.py). The
package is not named `audit`: that name is the API function `realign.audit`."""
