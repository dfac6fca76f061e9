"""One place that sets up logging (rich console handler) for the CLI and benchmarks."""

import logging

from rich.console import Console
from rich.logging import RichHandler

# Tables and progress bars go to stderr so that stdout stays clean for machine-readable output.
console = Console(stderr=True)


def setup_logging(level: int = logging.INFO) -> None:
    """Route the root logger through rich; idempotent."""
    root = logging.getLogger()
    if any(isinstance(h, RichHandler) for h in root.handlers):
        root.setLevel(level)
        return
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(level)
