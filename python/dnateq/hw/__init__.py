"""Hardware cost model: energy, latency and area of a DNA-TEQ quantized model on
the paper's accelerator against an INT8 one -- analytical estimates (SPEC
section 8), never measurements.

- :func:`estimate` -- per-layer and total energy, latency and area of both
  designs; ``.energy_ratio`` (DNA-TEQ / INT8), ``.speedup`` (INT8 time /
  DNA-TEQ time), ``.to_markdown()``, ``.to_dict()``, ``.to_csv()``, ``.plot()``.
- :func:`sweep` -- QAPPA-style design-space exploration over PEs, units,
  bandwidth, buffer size and bit-width, with the Pareto front of performance
  per area against energy (``.pareto()``, ``.plot_pareto()``).
- :class:`HWConfig` / :data:`DEFAULT_CONFIG` -- every constant of the model
  with its unit and source (Horowitz, ISSCC 2014; the seed's accelerator).

The formulas are in :mod:`dnateq.hw.model`, the layer tracing in
:mod:`dnateq.hw.shapes` (:func:`trace_layers`); :func:`evaluate` applies the
model to already traced layers (one trace, many configurations).
"""
from .config import DEFAULT_CONFIG, SOURCES, HWConfig
from .estimate import HWEstimate, estimate, evaluate
from .model import lut_bins, quant_rounds, storage_bits
from .shapes import LayerShape, trace_layers
from .sweep import SweepResult, sweep

__all__ = ["estimate", "evaluate", "HWEstimate", "sweep", "SweepResult", "HWConfig",
           "DEFAULT_CONFIG", "SOURCES", "LayerShape", "trace_layers", "storage_bits", "lut_bins",
           "quant_rounds"]
