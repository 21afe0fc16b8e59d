"""MXFP8 format: quantize / dequantize and the MXFP8Tensor wrapper."""
from mxep.format.mxfp8 import BLOCK_SIZE, E4M3_MAX, SCALE_MODES, MXFP8Tensor, dequantize_mxfp8, to_mxfp8

__all__ = ["BLOCK_SIZE", "E4M3_MAX", "SCALE_MODES", "MXFP8Tensor", "dequantize_mxfp8", "to_mxfp8"]
