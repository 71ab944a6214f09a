"""dnateq: DNA-TEQ adaptive exponential quantization for PyTorch.

Importing the package loads the compiled operators (``torch.ops.dnateq.*``)
and registers their fake kernels so that ``torch.compile`` can trace them.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  registers the operators (TORCH_LIBRARY)
from . import ops, reference  # ops also registers the fake kernels (beside each wrapper)
from .ops import (exp_conv2d_count, exp_conv2d_lut, exp_dequantize, exp_error,
                  exp_errors, exp_fit, exp_fits, exp_linear_count, exp_linear_lut,
                  exp_lut_layout, exp_pack, exp_quantize, exp_unpack, weight_terms)
from . import nn  # noqa: E402  quantized modules (dnateq.nn.ExpLinear, ...)
from .calibrate import quantize  # noqa: E402
from .report import Report, report  # noqa: E402
from . import baselines  # noqa: E402  uniform INT-b baseline (paper Tables III/IV)
from .persistence import DnateqFileError, load, save  # noqa: E402
from . import analysis  # noqa: E402  distribution tables, layer errors, bit plots, threshold sweep
from . import eval, models  # noqa: E402  evaluation pipelines (dnateq.eval), the paper's models
from . import hw  # noqa: E402  energy / latency / area estimates against an INT8 accelerator

__version__ = "0.1.0"

__all__ = [
    "ops", "reference", "exp_quantize", "exp_dequantize", "exp_pack",
    "exp_unpack", "exp_linear_count", "exp_conv2d_count", "exp_linear_lut",
    "exp_conv2d_lut", "exp_fit", "exp_fits", "exp_error", "exp_errors", "weight_terms",
    "exp_lut_layout",
    "nn", "quantize", "report", "Report", "baselines", "save", "load", "DnateqFileError",
    "analysis", "eval", "models", "hw",
]
