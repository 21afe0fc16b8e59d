"""mxep: fused MXFP8 expert-parallel dispatch/combine for MoE training."""
from mxep.format import MXFP8Tensor, dequantize_mxfp8, to_mxfp8

__all__ = ["MXFP8Tensor", "dequantize_mxfp8", "to_mxfp8"]
__version__ = "0.1.0"
