"""Compatibility module: ``dnateq.quantize`` and its helpers now live in the
:mod:`dnateq.calibration` package (one module per calibration step) and the
shared helpers in :mod:`dnateq._common`. The names other code imported from
here keep working."""
# flake8: noqa: F401  (re-exports)
from ._common import INPUT_KEYS, batch_input
from ._common import first_tensor as _first_tensor_or_none
from ._common import get_module as _get_module
from ._common import matches as _matches
from ._common import model_device as _model_device
from ._common import progress as _progress
from ._common import set_module as _set_module
from ._common import to_device as _to_device
from .calibration.allocate import choose_bits
from .calibration.build import deliver
from .calibration.fit import exponential_rss
from .calibration.pipeline import quantize
from .calibration.quality import proxy_quality
from .calibration.select import QUANTIZED as _QUANTIZED
from .calibration.select import disable_fast_paths as _disable_fast_paths
from .calibration.select import select_layers
from .calibration.trace import Trace as _Trace
from .calibration.trace import Traces, trace_layers

__all__ = ["quantize", "exponential_rss", "batch_input", "INPUT_KEYS", "select_layers",
           "trace_layers", "Traces", "deliver", "choose_bits"]


def _first_tensor(out):
    """The first tensor of a model output, for the proxy metric (TypeError if none)."""
    t = _first_tensor_or_none(out)
    if t is None:
        raise TypeError(f"dnateq.quantize: cannot find a tensor in the model output "
                        f"({type(out).__name__}) for the proxy metric; pass eval_fn")
    return t
