"""SwiGLU fused with MXFP8 quantization on the dispatch layout (kernels, autograd and public op in
``swiglu``; the pure-torch reference in ``naive``)."""
from mxep.swiglu.swiglu import swiglu_mxfp8

__all__ = ["swiglu_mxfp8"]
