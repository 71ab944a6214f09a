"""Formatting helpers of the hardware reports: the shared tables, figure saving."""
from __future__ import annotations

from .._table import cell, csv_text, markdown_table  # noqa: F401  (re-exported)


def save_figure(fig, path) -> None:
    """Save ``fig`` to ``path`` (format from the extension), creating no pyplot state."""
    if path is not None:
        fig.savefig(str(path), dpi=120, bbox_inches="tight")
