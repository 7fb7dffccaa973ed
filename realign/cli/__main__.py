"""`python -m realign.cli`: the same as the `realign` command."""

from realign.cli import main

main()
