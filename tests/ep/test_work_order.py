"""The walk orders of the peer kernels (``TUNING["peer_order"]``, ``rows.work_item``): every
order must visit every work item exactly once (a skipped item is a row never sent, a repeated
one a row sent twice), and the spread order must touch every part of the list early. Runs the
Triton helper itself (interpreter on CPU) against a plain-Python expectation."""
import pytest
import torch
import triton
import triton.language as tl

from mxep.kernels.quantize import triton_available_for
from mxep.kernels.rows import TUNING, work_item, work_steps

pytestmark = pytest.mark.skipif(not triton_available_for(torch.empty(0)),
                                reason="CPU kernel tests need TRITON_INTERPRET=1")


@triton.jit
def _walk_kernel(out_ptr, total, rot, SPREAD: tl.constexpr, NPROG: tl.constexpr):
    # out[u] = the item of step u, as the persistent kernels deal the steps out
    u = tl.program_id(0)
    while u < work_steps(total, SPREAD):
        tl.store(out_ptr + u, work_item(u, total, rot, SPREAD))
        u += NPROG


def walk(total: int, rot: int, spread: int, nprog: int = 3) -> list[int]:
    steps = -(-total // spread) * spread
    out = torch.full((max(steps, 1),), -1, dtype=torch.int32)
    _walk_kernel[(nprog,)](out, total, rot, SPREAD=spread, NPROG=nprog)
    return out[:steps].tolist()


@pytest.mark.parametrize("parts", [TUNING["spread_parts"], 3, 7])
@pytest.mark.parametrize("total", [1, 5, 15, 16, 17, 33, 250, 1023])
def test_spread_walk_visits_every_item_once(total, parts):
    items = walk(total, 0, parts)
    real = [t for t in items if t != total]
    assert sorted(real) == list(range(total))                 # a permutation of the items
    assert len(items) - len(real) < parts                      # at most parts - 1 empty steps
    assert -1 not in items
    m = -(-total // parts)
    first = {t // m for t in items[:parts] if t != total}
    assert len(first) == min(parts, -(-total // m))           # first steps: one item of every part


@pytest.mark.parametrize("total,rot", [(1, 0), (7, 0), (7, 3), (7, 6), (100, 99), (100, 41)])
def test_rotated_walk_visits_every_item_once(total, rot):
    items = walk(total, rot, 1)
    assert items == [(u + rot) % total for u in range(total)]
