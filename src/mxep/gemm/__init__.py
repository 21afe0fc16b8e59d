"""Grouped GEMM on the dispatch layout (kernel, autograd and public op in ``grouped_gemm``; the
pure-torch reference in ``naive``)."""
from mxep.gemm.grouped_gemm import IMPLS, grouped_mm_mxfp8

__all__ = ["IMPLS", "grouped_mm_mxfp8"]
