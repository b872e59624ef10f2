"""The one way every report draws (training loss, annealing report, gap charts): matplotlib on its headless
backend, and figures saved as PNG files atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from core.artifacts import atomic_write_bytes


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend (no display needed); imported on first use, as it is slow to
    import and most commands draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path, dpi: int = 110) -> None:
    """Write `fig` to `path` as a PNG (atomically: a reader never sees half a file) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
