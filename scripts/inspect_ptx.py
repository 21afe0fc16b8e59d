"""Compile mxep's peer kernels for sm_90 on a machine without a GPU and print their global
memory access widths (PTX ``st.global`` / ``ld.global`` variants).

No device time needed: Triton's bundled ptxas compiles for Hopper anywhere. Pointer arguments
and the integer sizes that are multiples of 16 get the same ``tt.divisibility`` hints Triton's
JIT gives them at launch, so the PTX matches what runs. Usage::

    PYTHONPATH=src python scripts/inspect_ptx.py
"""
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import mxep.kernels.dispatch as dispatch
import mxep.kernels.rows as rows

TARGET = GPUTarget("cuda", 90, 32)
I32 = "i32"


def access_widths(fn, signature: dict, constexprs: dict, divisible_ints=(), num_warps=4) -> tuple[list, list]:
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(signature)
             if signature[n].startswith("*") or n in divisible_ints}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=TARGET, options={"num_warps": num_warps})
    ptx = kernel.asm["ptx"]
    return (sorted(set(re.findall(r"st\.global(?:\.\w+)*", ptx))),
            sorted(set(re.findall(r"ld\.global(?:\.\w+)*", ptx))))


DISPATCH_SIG = {"x_ptr": "*i16", "n_rows": I32, "H": I32, "rank": I32, "capacity": I32, "row_base_ptr": "*i32",
                "src_end_ptr": "*i32", "E": I32, "data_base_ptr": "*u8", "scale_base_ptr": "*u8",
                "dst_delta_ptr": "*i64", "out_data_ptr": "*u8", "out_scale_ptr": "*u8", "group_end_ptr": "*i32",
                "recv_ptr": "*i32", "QUANTIZE": "constexpr", "FLOOR": "constexpr",
                "SCALES_ALIGNED": "constexpr", "HW_CAST": "constexpr", "STAGGER": "constexpr", "L": "constexpr",
                "L_P": "constexpr", "ALIGN": "constexpr", "E_P": "constexpr",
                "BLOCK_M": "constexpr", "BLOCK_K": "constexpr", "NPROG": "constexpr"}
COMBINE_SIG = {"src_ptr": "*i16", "H": I32, "rank": I32, "N": I32, "capacity": I32, "row_base_ptr": "*i32",
               "src_end_ptr": "*i32", "E": I32,
               "dst_base_ptr": "*i16", "dst_delta_ptr": "*i64", "out_ptr": "*i16",
               "W": "constexpr", "W_P": "constexpr", "L": "constexpr", "E_P": "constexpr", "STAGGER": "constexpr",
               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "NPROG": "constexpr"}


def main() -> None:
    print("MXFP8 dispatch push (H=7168, E=256, W=4): block_m x block_k, warps -> stores")
    for bm, bk, warps in [(1, 8192, 4), (1, 2048, 8), (4, 512, 4), (1, 8192, 8)]:
        consts = {"QUANTIZE": True, "FLOOR": False, "SCALES_ALIGNED": True, "HW_CAST": True, "STAGGER": True,
                  "L": 64, "L_P": 64, "ALIGN": 32, "E_P": 256, "BLOCK_M": bm, "BLOCK_K": bk, "NPROG": 2112}
        st, _ = access_widths(dispatch._dispatch_push_kernel, DISPATCH_SIG, consts, ("n_rows", "H", "E"), warps)
        print(f"  {bm} x {bk}, {warps} warps: {st}")
    print("combine push (bf16):")
    for bm, bn, warps in [(1, 8192, 8), (4, 1024, 8)]:
        consts = {"W": 4, "W_P": 4, "L": 64, "E_P": 256, "STAGGER": True, "BLOCK_M": bm, "BLOCK_N": bn, "NPROG": 2112}
        st, _ = access_widths(rows._combine_push_kernel, COMBINE_SIG, consts, ("H", "N", "E"), warps)
        print(f"  {bm} x {bn}, {warps} warps: {st}")


if __name__ == "__main__":
    main()
