"""Formatting helpers shared by the hardware reports (markdown cells, CSV)."""
from __future__ import annotations

import csv
import io
import math
from typing import Any, Iterable, Sequence


def cell(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.{digits}g}"
    if isinstance(v, (list, tuple)):
        return "x".join(str(s) for s in v)
    return str(v)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 4) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(cell(v, digits) for v in r) + " |")
    return "\n".join(lines)


def csv_text(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(headers)
    for r in rows:
        w.writerow(["" if v is None else ("x".join(map(str, v)) if isinstance(v, (list, tuple))
                                          else v) for v in r])
    return buf.getvalue()


def save_figure(fig, path) -> None:
    """Save ``fig`` to ``path`` (format from the extension), creating no pyplot state."""
    if path is not None:
        fig.savefig(str(path), dpi=120, bbox_inches="tight")
