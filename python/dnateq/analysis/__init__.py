"""Analysis tools of dnateq (SPEC section 7): the paper's tables and figures.

- :func:`fit_distributions`: goodness of fit (RSS) of normal, exponential,
  Pareto and uniform distributions to every layer's weights and activations —
  the paper's Tables I-II — with histogram + fitted-curve plots (Fig. 1-2).
- :func:`layer_output_errors`: per-layer max / mean absolute output difference
  of a quantized model (DNA-TEQ or a uniform baseline) against its float model
  (seed 002's 32/8/4-bit comparison).
- :func:`plot_bits`: bits per layer of a quantized model.
- :func:`threshold_sweep`: bit choice and quality loss against ``Thr_w``
  (Fig. 8), from one calibration.

Plots use matplotlib (imported on first use; install ``matplotlib``), build
``matplotlib.figure.Figure`` objects directly and never call ``plt.show()``, so
they work under any backend, Agg included.
"""
from .bits import plot_bits
from .distributions import (DISTRIBUTIONS, PAPER_DISTRIBUTIONS, DistributionFits,
                            distribution_rss, fit_distributions, rss_table)
from .errors import LayerErrors, layer_output_errors
from ..calibration.allocate import choose_bits
from .sweep import DEFAULT_THRESHOLDS, ThresholdSweep, threshold_sweep

__all__ = [
    "fit_distributions", "DistributionFits", "distribution_rss", "rss_table", "DISTRIBUTIONS",
    "PAPER_DISTRIBUTIONS", "layer_output_errors", "LayerErrors", "plot_bits",
    "threshold_sweep", "ThresholdSweep", "choose_bits", "DEFAULT_THRESHOLDS",
]
