"""Per-layer and total report of a quantized model (SPEC section 7).

``dnateq.report(qmodel)`` collects every :class:`dnateq.nn.ExpLinear` /
:class:`dnateq.nn.ExpConv2d` of ``qmodel``: name, kind, weight shape, ``n``,
alpha, S/beta of W and A, RMAE of W and A, the tensor that started the base
search, the exponential RSS of both tensors, signedness and packed bytes.

Totals (weights only; biases stay float and are not counted):

- ``avg_bits``: the paper's convention, ``n`` per weight, averaged weighted by
  the weight count;
- ``storage_bits``: the honest storage figure, ``n + 1`` for signed weight
  tensors (the sign bit), ``n`` for unsigned ones;
- ``compression_vs_int8``: ``{"paper": 1 - avg_bits/8, "storage": 1 - storage_bits/8}``;
- ``bytes_fp32`` (4 per weight), ``bytes_int8`` (1 per weight),
  ``bytes_packed`` (the packed buffers, row padding included).
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any, Dict, List, Optional

import torch.nn as nn

from .nn.modules import ExpConv2d, ExpLinear

__all__ = ["report", "Report"]

_COLUMNS = ["name", "kind", "shape", "n", "alpha", "S_w", "beta_w", "S_a", "beta_a",
            "rmae_w", "rmae_a", "start", "rss_w", "rss_a", "w_signed", "a_signed",
            "weights", "packed_bytes", "w_params", "S_w_min", "S_w_max", "smooth",
            "mechanisms"]


class Report:
    """The result of :func:`report`: ``layers`` (list of dicts), ``totals``
    (dict), ``skipped`` ({name: reason}) and ``notes``."""

    def __init__(self, layers: List[Dict[str, Any]], totals: Dict[str, Any],
                 skipped: Dict[str, str], notes: List[str]):
        self.layers, self.totals, self.skipped, self.notes = layers, totals, skipped, notes

    def to_dict(self) -> Dict[str, Any]:
        return {"layers": [dict(r) for r in self.layers], "totals": dict(self.totals),
                "skipped": dict(self.skipped), "notes": list(self.notes)}

    def to_csv(self) -> str:
        """One row per quantized layer (columns as :data:`_COLUMNS`)."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in self.layers:
            row = dict(r)
            row["shape"] = "x".join(str(s) for s in r["shape"])
            row["mechanisms"] = "; ".join(r.get("mechanisms") or [])
            w.writerow({k: row.get(k) for k in _COLUMNS})
        return buf.getvalue()

    def to_markdown(self) -> str:
        def f(v):
            if isinstance(v, str) and v.startswith("per-channel"):
                return v
            if isinstance(v, float):
                return f"{v:.4g}"
            if isinstance(v, (list, tuple)):
                return "x".join(str(s) for s in v)
            return "" if v is None else str(v)
        cols = ["name", "kind", "shape", "n", "alpha", "S_w", "beta_w", "S_a", "beta_a",
                "rmae_w", "rmae_a", "start", "rss_w", "rss_a", "a_signed"]
        if any(r.get("mechanisms") for r in self.layers):
            cols.append("mechanisms")
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.layers:
            r = dict(r)
            if r.get("w_params") == "per-channel":   # S_w/beta_w are means: say so
                r["S_w"] = f"per-channel {r['S_w_min']:.4g}..{r['S_w_max']:.4g}"
                r["beta_w"] = "per-channel"
            if r.get("smooth"):
                r["name"] = f"{r['name']} (smoothed)"
            lines.append("| " + " | ".join(
                "; ".join(r.get(c) or []) if c == "mechanisms" else f(r.get(c))
                for c in cols) + " |")
        t = self.totals
        lines += [
            "",
            f"- quantized layers: {t['layers']}, weights: {t['weights']}",
            f"- average bits (paper, n only): {t['avg_bits']:.3f}",
            f"- storage bits (with sign): {t['storage_bits']:.3f}; with the layers' float32 "
            f"parameters (scales, offsets, smoothing): {t['storage_bits_with_params']:.3f}",
            f"- compression vs INT8: {t['compression_vs_int8']['paper']:.1%} (paper), "
            f"{t['compression_vs_int8']['storage']:.1%} (storage)",
            f"- bytes: FP32 {t['bytes_fp32']}, INT8 {t['bytes_int8']}, packed {t['bytes_packed']}",
        ]
        est = t.get("estimate")
        if isinstance(est, dict):
            where = ("eval_fn" if est.get("metric") == "eval_fn" else
                     f"proxy on {est.get('held_out_batches', 0)} held-out batch(es)"
                     if not est.get("on_calibration_batches") else
                     "proxy on calibration batches")
            lines.append(f"- estimated quality loss ({where}): {est.get('loss', 0.0):.4g} "
                         f"(float {est.get('base_quality', 0.0):.4g}, quantized "
                         f"{est.get('quality', 0.0):.4g})")
        if t.get("method"):
            lines.append(f"- bit allocation: {t['method']}; mechanisms: "
                         + (", ".join(t.get("passes") or []) or "none"))
        fid = t.get("fidelity")
        if isinstance(fid, dict) and (fid.get("cosine") is not None or fid.get("limit")):
            parts = []
            if fid.get("cosine") is not None:
                parts.append(f"mean cosine to float {fid['cosine']:.4f}"
                             + (f" (floor {fid['min_cosine']:.4g})"
                                if fid.get("min_cosine") is not None else " (no floor)"))
            if fid.get("limit"):
                parts.append("search stopped by: " + {
                    "loss": "max_loss", "fidelity": "the cosine floor (min_cosine)",
                    "path_end": "the smallest bits (every layer at min(bits))",
                    "budget": "bits_budget"}.get(fid["limit"], fid["limit"]))
            lines.append("- output fidelity: " + "; ".join(parts))
        if self.skipped:
            lines.append("- left in float: " + ", ".join(
                f"{n} ({why})" for n, why in self.skipped.items()))
        for n in self.notes:
            lines.append(f"- note: {n}")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return self.to_markdown()


def report(qmodel: nn.Module) -> Report:
    """Per-layer parameters, errors and bits, and totals, of a quantized model."""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"dnateq.report: expects an nn.Module, got {type(qmodel).__name__}")
    rows: List[Dict[str, Any]] = []
    for name, m in qmodel.named_modules():
        if not isinstance(m, (ExpLinear, ExpConv2d)):
            continue
        inf = m.info or {}
        pc = m.w_scale is not None
        rows.append(dict(
            name=name, kind=m._kind, shape=list(m.w_shape), n=m.bits, alpha=m.alpha,
            S_w=m.sw, beta_w=m.bw, S_a=m.sa, beta_a=m.ba,
            rmae_w=inf.get("rmae_w"), rmae_a=inf.get("rmae_a"), start=inf.get("start"),
            rss_w=inf.get("rss_w"), rss_a=inf.get("rss_a"), w_signed=m.w_signed,
            a_signed=m.a_signed, weights=m.weight_count, packed_bytes=int(m.w_packed.numel()),
            # per-channel weights: S_w/beta_w above are the means of w_scale/w_offset
            w_params="per-channel" if pc else "per-tensor",
            S_w_min=float(m.w_scale.min()) if pc else m.sw,
            S_w_max=float(m.w_scale.max()) if pc else m.sw,
            smooth=m.smooth is not None,
            mechanisms=list(inf.get("mechanisms", [])),
            # float32 parameters the layer stores besides its codes: alpha, S/beta of
            # A and W (or w_scale/w_offset, one pair per output channel), smooth [K]
            param_bits=32 * (3 + (2 * m.w_shape[0] if pc else 2)
                             + (int(m.smooth.numel()) if m.smooth is not None else 0)),
        ))
    if not rows:
        raise ValueError("dnateq.report: the model has no dnateq quantized layer "
                         "(use dnateq.quantize first)")
    nw = sum(r["weights"] for r in rows)
    avg = sum(r["n"] * r["weights"] for r in rows) / nw
    sto = sum((r["n"] + (1 if r["w_signed"] else 0)) * r["weights"] for r in rows) / nw
    qinfo: Optional[Dict[str, Any]] = getattr(qmodel, "dnateq_info", None)
    totals: Dict[str, Any] = dict(
        layers=len(rows), weights=nw, avg_bits=avg, storage_bits=sto,
        compression_vs_int8={"paper": 1.0 - avg / 8.0, "storage": 1.0 - sto / 8.0},
        bytes_fp32=4 * nw, bytes_int8=nw, bytes_packed=sum(r["packed_bytes"] for r in rows),
        # storage bits plus the layers' float32 parameters spread over their weights:
        # per-channel scales/offsets cost 64 bits per output channel, which matters
        # on small layers
        storage_bits_with_params=sto + sum(r["param_bits"] for r in rows) / nw,
    )
    notes: List[str] = []
    skipped: Dict[str, str] = {}
    if isinstance(qinfo, dict):
        skipped = dict(qinfo.get("skipped", {}))
        for k in ("base_quality", "quality", "loss", "threshold", "fallback", "metric"):
            totals[k] = qinfo.get(k)
        totals["method"] = qinfo.get("method", "paper")
        totals["passes"] = list(qinfo.get("passes", []))
        est = qinfo.get("estimate")
        if isinstance(est, dict):
            totals["estimate"] = dict(est)
        if qinfo.get("limit") or qinfo.get("cosine") is not None:
            totals["fidelity"] = dict(cosine=qinfo.get("cosine"),
                                      min_cosine=qinfo.get("min_cosine"),
                                      limit=qinfo.get("limit"))
        if qinfo.get("fallback"):
            notes.append("no threshold met max_loss: the all-max-bit fallback configuration "
                         "was returned" if totals["method"] == "paper" else
                         "no configuration met max_loss: the all-max-bit fallback "
                         "configuration was returned")
        if (isinstance(est, dict) and est.get("on_calibration_batches")
                and est.get("metric") == "proxy"):
            notes.append("the proxy was judged on calibration batches (the loader had none "
                         "left to hold out): its estimate is optimistic")
        if qinfo.get("shared"):
            notes.append("shared layers (quantized once, kept shared): " + ", ".join(
                f"{n} = {', '.join(a)}" for n, a in qinfo["shared"].items()))
    for k in ("avg_bits", "storage_bits"):
        assert math.isfinite(totals[k])
    return Report(rows, totals, skipped, notes)
