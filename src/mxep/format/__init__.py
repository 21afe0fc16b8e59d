"""MXFP8 format: the rules (``spec``), the quantize and dequantize kernels with their registered
ops, the tensor type, and the pure-torch reference (``naive``)."""
from mxep.format.dequantize import dequantize_mxfp8
from mxep.format.mxfp8 import MXFP8Tensor, to_mxfp8
from mxep.format.spec import BLOCK_SIZE, E4M3_MAX, SCALE_MODES

__all__ = ["BLOCK_SIZE", "E4M3_MAX", "SCALE_MODES", "MXFP8Tensor", "dequantize_mxfp8", "to_mxfp8"]
