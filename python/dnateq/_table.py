"""Plain-text tables shared by the reports (dnateq.analysis, dnateq.hw):
markdown cells with 4 significant digits, markdown tables and CSV."""
from __future__ import annotations

import csv
import io
import math
from typing import Any, Iterable, Sequence

__all__ = ["cell", "markdown_table", "csv_text"]


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
