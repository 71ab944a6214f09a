"""dnateq: DNA-TEQ adaptive exponential quantization for PyTorch.

Importing the package loads the compiled operators (``torch.ops.dnateq.*``)
and registers their fake kernels so that ``torch.compile`` can trace them.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  registers the operators (TORCH_LIBRARY)
from . import ops, reference  # ops also registers the fake kernels (beside each wrapper)
from .ops import *  # noqa: F401,F403  the public operators (ops.__all__)
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
    "ops", "reference", *ops.__all__,
    "nn", "quantize", "report", "Report", "baselines", "save", "load", "DnateqFileError",
    "analysis", "eval", "models", "hw",
]
