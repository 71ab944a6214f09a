"""Quantized modules of dnateq (SPEC section 6): ``ExpLinear``, ``ExpConv2d``
and ``ExpMultiheadAttention`` (a float MHA with explicit Q/K/V/out Linears)."""
from .modules import MODES, ExpConv2d, ExpLinear, ExpMultiheadAttention

__all__ = ["ExpLinear", "ExpConv2d", "ExpMultiheadAttention", "MODES"]
