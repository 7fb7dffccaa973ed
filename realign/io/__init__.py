"""Everything that touches the file system: checkpoints, adapters, atomic output.

Nothing in this package does linear algebra; it reads and writes tensors by name.
"""
