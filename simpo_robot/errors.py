"""User-facing errors: the CLI prints their message (what is wrong and what to do) without a traceback."""


class SimpoRobotError(Exception):
    """An error caused by the user's input or environment, with a message that says how to fix it."""
