"""Errors a user can cause. The CLI turns each into one line on stderr and exit code 2."""


class RealignError(Exception):
    """Bad input, bad options or an environment problem the user can fix."""
