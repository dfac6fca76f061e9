"""One logging path for training metrics: metrics.jsonl always, TensorBoard when installed.

Keys are namespaced (`charts/`, `losses/`, `eval/`, `simpo/`) and logged against env steps.
"""

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsLogger:
    """Writes one JSON line per call to OUT/metrics.jsonl and the same scalars to OUT/tensorboard/.

    Disabled instances (non-main processes) do nothing, so callers need no rank checks.
    """

    def __init__(self, out: Path, enabled: bool = True):
        self.enabled = enabled
        self.out = Path(out)
        self._file = None
        self._tb = None

    def _open(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self._file = (self.out / "metrics.jsonl").open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        except ImportError:  # tensorboard is a dependency, but the jsonl log must not depend on it
            log.warning("tensorboard is not installed; logging to metrics.jsonl only")

    def log(self, env_steps: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._open()
        self._file.write(json.dumps({"env_steps": env_steps, **metrics}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, env_steps)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def plot_learning_curve(curve: list[tuple[int, float]], path: Path, title: str) -> None:
    """Success rate (%) against env steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    steps, success = zip(*curve, strict=True) if curve else ((), ())
    ax.plot(steps, success, marker="o")
    ax.set_xlabel("env steps")
    ax.set_ylabel("success (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
