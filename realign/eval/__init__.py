"""`realign eval`: prompt sources and splits (sources.py), generation, refusal judges, rates with
Wilson intervals, and the evaluation itself (run.py)."""
