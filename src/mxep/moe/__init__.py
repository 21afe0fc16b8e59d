"""The MoE layer built on the Buffer and the grouped GEMM (:mod:`mxep.moe.layer`)."""
from mxep.moe.layer import MoE, quantize_straight_through

__all__ = ["MoE", "quantize_straight_through"]
