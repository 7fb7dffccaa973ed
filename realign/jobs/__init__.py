"""Jobs: read inputs through realign.io, run a method, write output. The Python API of each command."""
