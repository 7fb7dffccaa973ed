"""`realign repair`: the search of DESIGN 2.5 over the registered data-free methods: grid.py (the
candidates), policy.py (early stopping and the choice, pure), memory.py (the model loaded once),
run.py (the loop and the output), render.py (the Pareto plot). The package is not named `repair`:
that name is the API function `realign.repair`."""
