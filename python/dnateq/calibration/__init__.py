"""The calibration steps of ``dnateq.quantize`` (SPEC section 3), one module per
step: layer selection, bounded traces, per-layer fits, bit allocation and the
model passes (smoothing, bias correction). ``dnateq.calibrate`` is being moved
here step by step; until then it holds ``quantize``.
"""
