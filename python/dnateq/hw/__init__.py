"""Hardware cost model: energy, latency and area of a DNA-TEQ quantized model on
the paper's accelerator against an INT8 one -- analytical estimates (SPEC
section 8), never measurements.

- :func:`estimate` -- per-layer and total energy, latency and area of both
  designs; ``.energy_ratio`` (DNA-TEQ / INT8), ``.speedup`` (INT8 time /
  DNA-TEQ time), ``.to_markdown()``, ``.to_dict()``, ``.to_csv()``, ``.plot()``.
- :func:`sweep` -- QAPPA-style design-space exploration over PEs, units,
  bandwidth, buffer size and bit-width, with the Pareto front of performance
  per area against energy (``.pareto()``, ``.plot_pareto()``).
- :func:`compare_designs` -- INT8, INT4, LightPE-1/2 and DNA-TEQ, also at
  equal area; :func:`sensitivity` -- the headline ratios against every choice.
- :class:`HWConfig` / :data:`DEFAULT_CONFIG` -- every constant of the model
  with its unit and source (DRAMSim3's HMC config, seed 002's MAC synthesis,
  Horowitz ISSCC 2014, the seed's accelerator) or marked as a choice.
- :mod:`dnateq.hw.memory` (the 3D-stacked DRAM and the tile schedule),
  :mod:`dnateq.hw.units` (unit costs from synthesis points),
  :mod:`dnateq.hw.networks` (the paper's networks, precomputed).

The formulas are in :mod:`dnateq.hw.model`, the layer tracing in
:mod:`dnateq.hw.shapes` (:func:`trace_layers`); :func:`evaluate` applies the
model to already traced layers (one trace, many configurations).
"""
from . import fieldsim, memory, networks, units
from .config import DEFAULT_CONFIG, SOURCES, HWConfig
from .designs import (SENSITIVITY_AXES, DesignComparison, compare_designs, sensitivity,
                      sensitivity_markdown)
from .memory import PlacementError
from .estimate import HWEstimate, estimate, evaluate
from .model import lut_bins, quant_rounds, storage_bits
from .shapes import LayerShape, trace_layers
from .sweep import SweepResult, sweep

__all__ = ["estimate", "evaluate", "HWEstimate", "sweep", "SweepResult", "HWConfig",
           "DEFAULT_CONFIG", "SOURCES", "LayerShape", "trace_layers", "storage_bits", "lut_bins",
           "quant_rounds", "compare_designs", "DesignComparison", "sensitivity",
           "sensitivity_markdown", "SENSITIVITY_AXES", "PlacementError", "memory", "units",
           "networks", "fieldsim"]
