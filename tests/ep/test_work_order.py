"""The walk order of the peer kernels (``EPConfig.spread_parts``, ``plan.work_item``): every
order must visit every work item exactly once (a skipped item is a row never sent, a repeated
one a row sent twice), and the spread order must touch every part of the list early. Runs the
Triton helper itself (interpreter on CPU) against a plain-Python expectation."""
import pytest
import torch
import triton
import triton.language as tl

from mxep._utils import triton_available_for
from mxep.ep.config import EPConfig
from mxep.ep.transport.symm_mem.plan import work_item, work_steps

pytestmark = pytest.mark.skipif(not triton_available_for(torch.empty(0)),
                                reason="CPU kernel tests need TRITON_INTERPRET=1")


@triton.jit
def _walk_kernel(out_ptr, total, SPREAD: tl.constexpr, NPROG: tl.constexpr, BLOCK: tl.constexpr):
    # out[u] = the item of step u, the steps dealt out to persistent programs as the peer
    # kernels do (BLOCK consecutive steps at a time: the helper is elementwise, and the
    # interpreter pays per operation, not per element)
    u = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    steps = work_steps(total, SPREAD)
    while tl.min(u, axis=0) < steps:
        tl.store(out_ptr + u, work_item(u, total, SPREAD), mask=u < steps)
        u += NPROG * BLOCK


def walk(total: int, spread: int, nprog: int = 3, block: int = 8) -> list[int]:
    steps = -(-total // spread) * spread
    out = torch.full((max(steps, 1),), -1, dtype=torch.int32)
    _walk_kernel[(nprog,)](out, total, SPREAD=spread, NPROG=nprog, BLOCK=block)
    return out[:steps].tolist()


@pytest.mark.parametrize("parts", [EPConfig().spread_parts, 3, 7])
@pytest.mark.parametrize("total", [1, 5, 15, 16, 17, 33, 250, 1023])
def test_spread_walk_visits_every_item_once(total, parts):
    items = walk(total, parts, block=1 if total < 20 else 64)
    real = [t for t in items if t != total]
    assert sorted(real) == list(range(total))                 # a permutation of the items
    assert len(items) - len(real) < parts                      # at most parts - 1 empty steps
    assert -1 not in items
    m = -(-total // parts)
    first = {t // m for t in items[:parts] if t != total}
    assert len(first) == min(parts, -(-total // m))           # first steps: one item of every part


@pytest.mark.parametrize("total", [1, 7, 100])
def test_one_part_walks_from_item_zero(total):
    """``spread_parts=1``: the items in order, no empty step."""
    assert walk(total, 1) == list(range(total))
