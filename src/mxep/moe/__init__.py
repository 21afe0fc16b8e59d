"""The MoE layer built on the Buffer, the grouped GEMM and SwiGLU (``layer``; its eager step as one
autograd node in ``fused``); one training step captured in a CUDA graph (``capture``); the dense
single-process reference and the bf16 baselines in ``naive``."""
from mxep.moe.capture import CapturedStep
from mxep.moe.layer import MoE

__all__ = ["MoE", "CapturedStep"]
