"""Host-side integer helpers for the launchers.

``triton.cdiv`` / ``triton.next_power_of_2`` are Triton ``constexpr_function`` objects in Triton
3.6: callable from host code, but each call goes through argument unwrapping (~11 calls per
dispatch). These plain functions give the same values for the positive sizes the launchers pass.
"""
from __future__ import annotations

__all__ = ["cdiv", "next_power_of_2"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
