"""Quantized modules of dnateq (SPEC section 6): ``ExpLinear``, ``ExpConv2d``
and ``ExpMultiheadAttention`` (a float MHA with explicit Q/K/V/out Linears);
``UniformLinear`` / ``UniformConv2d`` are the integer baseline's layers."""
from .modules import MODES, ExpConv2d, ExpLinear, ExpMultiheadAttention
from .uniform import UniformConv2d, UniformLinear

__all__ = ["ExpLinear", "ExpConv2d", "ExpMultiheadAttention", "MODES", "UniformLinear",
           "UniformConv2d"]
