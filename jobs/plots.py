"""Figures as PNG bytes, for the jobs that write plots beside their results.

matplotlib is imported on first use, with the non-interactive Agg backend (jobs run on
headless workers), so importing a job does not import it.
"""

from __future__ import annotations

import io
from typing import Any


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any) -> bytes:
    """The figure as PNG bytes (tight bounding box); the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    pyplot().close(fig)
    return buffer.getvalue()
