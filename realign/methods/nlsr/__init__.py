"""NLSR (Yi et al., AAAI 2025): find the safety-critical entries of an amplified aligned adapter
on calibration data and transplant them into the fine-tuned adapter, in the modules whose safety
region drifted most.

math.py holds the formulas; the stages are amplify.py -> regions.py -> patch.py (files between
them), oneshot.py runs all three in memory; pairs.py checks and pairs the two adapters.
"""

from ..base import Method, register

register(Method(
    name="nlsr",
    title="NLSR",
    summary="transplant the amplified aligned adapter's safety regions into the modules whose region drifted most",
    reference="Yi et al., NLSR: Neuron-Level Safety Realignment of Large Language Models Against Harmful Fine-Tuning, AAAI 2025",
    inputs=("base", "aligned_adapter", "adapter", "safety_data"),
    entry="realign.methods.nlsr.oneshot:nlsr",
    stages={"amplify": "realign.methods.nlsr.amplify:amplify", "regions": "realign.methods.nlsr.regions:regions",
            "patch": "realign.methods.nlsr.patch:patch"},
    data_free=False,
))
