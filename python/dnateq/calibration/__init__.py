"""The calibration steps of ``dnateq.quantize`` (SPEC section 3), one module per
step:

- :mod:`.call` — how the model is called on a batch (``model(x)``, a tuple's
  first item, a dict as ``model(**batch)``, or ``forward(model, batch)``), the
  token mask, and which output the proxy compares (:class:`ModelCall`).
- :mod:`.select` — which layers are quantized; ``nn.MultiheadAttention`` split
  into explicit Q/K/V/out Linears, Hugging Face ``Conv1D`` as Linear, shared
  modules found once (:func:`select_layers`, ``select.select``).
- :mod:`.trace` — bounded per-layer activation samples with exact extremes,
  merged across ranks under torchrun (:func:`trace_layers`, :func:`merge_traces`).
- :mod:`.fit` — per layer, the parameters and errors of W and A for every
  candidate ``n``, each tensor sorted once (:func:`fit_layer`).
- :mod:`.build` — quantized layers from the tables, cached per ``(layer, n)``
  (:class:`LayerCache`), and the hand-back to the caller (:func:`deliver`).
- :mod:`.quality` — ``eval_fn`` or the proxy on held-out batches (:class:`Quality`).
- :mod:`.allocate` — the bit choice: :class:`LayerSearch` (the one search
  object, also used by :func:`dnateq.analysis.threshold_sweep`) and the
  strategies by ``method`` name (:data:`STRATEGIES`; ``"paper"`` is the
  threshold rule).
- :mod:`.config` — :class:`QuantizeConfig`, the validated options.
- :mod:`.pipeline` — :func:`quantize` itself, top-down, and the passes.

Extension points:

- **Allocation strategies**: ``register_strategy(name, fn)`` with
  ``fn(search: LayerSearch, config: QuantizeConfig) -> Allocation``; selected by
  ``quantize(method=name)``. ``search.measure(cfg)`` evaluates a configuration
  (each distinct one once), ``search.tables`` holds every layer's errors per
  ``n``, ``search.base`` the float quality.
- **Passes**: ``register_pass(name, stage, fn)``, selected by
  ``quantize(passes=[...])``. Stage ``"before_fit"`` (``fn(state)``, after
  tracing, before fitting: smoothing — it may change weights and predecessors
  and set ``state.smooth[name]``) and stage ``"after_build"``
  (``fn(state, name, layer, float_layer)`` on every built quantized layer:
  bias correction). See :mod:`.pipeline`.
- Modules named ``passes`` and ``sensitivity`` in this package, when present,
  are imported here so that their registrations take effect.
"""
import importlib as _importlib
import importlib.util as _util

from .allocate import (STRATEGIES, Allocation, LayerSearch, bit_totals, choose_bits,
                       register_strategy, threshold_rule)
from .build import LayerCache, build_layer, deliver
from .call import ModelCall, comparable_output
from .config import QuantizeConfig
from .fit import exponential_rss, fit_layer, fit_layers, fit_pair
from .pipeline import (AFTER_BUILD, BEFORE_FIT, PASSES, STAGES, Calibration, calibrate,
                       executed_layers, quantize, register_pass, run_passes)
from .quality import Quality, proxy_quality
from .select import (QUANTIZED, Selection, disable_fast_paths, module_aliases, select_layers,
                     split_attention)
from .trace import Trace, Traces, merge_traces, trace_layers

for _plugin in ("passes", "sensitivity"):
    if _util.find_spec(f"{__name__}.{_plugin}") is not None:
        _importlib.import_module(f"{__name__}.{_plugin}")

__all__ = [
    "quantize", "calibrate", "QuantizeConfig", "select_layers", "split_attention",
    "disable_fast_paths", "QUANTIZED", "Trace", "Traces", "trace_layers", "merge_traces",
    "exponential_rss", "fit_layer", "fit_layers", "fit_pair", "build_layer", "LayerCache",
    "deliver", "Quality", "proxy_quality", "choose_bits", "bit_totals", "LayerSearch",
    "Allocation", "threshold_rule", "STRATEGIES", "register_strategy", "Calibration",
    "PASSES", "STAGES", "BEFORE_FIT", "AFTER_BUILD", "register_pass", "run_passes",
    "executed_layers", "ModelCall", "comparable_output", "Selection", "module_aliases",
]
