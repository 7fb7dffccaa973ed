"""NLSR (Yi et al., AAAI 2025): find the safety-critical entries of an amplified aligned adapter
on calibration data and transplant them into the fine-tuned adapter, in the modules whose safety
region drifted most.

math.py holds the formulas; the stages are amplify.py -> regions.py -> patch.py (files between
them), oneshot.py runs all three in memory; pairs.py checks and pairs the two adapters.
"""
