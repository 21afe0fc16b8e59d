"""The MoE layer built on the Buffer, the grouped GEMM and SwiGLU (``layer``); the dense
single-process reference in ``naive``."""
from mxep.moe.layer import MoE

__all__ = ["MoE"]
