"""`realign repair`: the search of DESIGN 2.5 over the registered data-free methods: grid.py (the
candidates), policy.py (early stopping and the choice, pure), memory.py (the model loaded once),
search.py (the loop and the output), render.py (the Pareto plot)."""
