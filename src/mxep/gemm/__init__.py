"""Grouped GEMM on the dispatch layout (kernel, autograd and public op in ``grouped_gemm``; the
MX weights cached per weight version in ``weight_cache``; the pure-torch reference in ``naive``)."""
from mxep.gemm.grouped_gemm import IMPLS, grouped_mm_layer, grouped_mm_mxfp8, resolve_impl
from mxep.gemm.weight_cache import MXWeightCache

__all__ = ["IMPLS", "MXWeightCache", "grouped_mm_layer", "grouped_mm_mxfp8", "resolve_impl"]
