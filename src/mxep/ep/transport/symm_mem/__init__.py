"""The symmetric-memory transport: memory regions, the counts-flags sync, the plan, the dispatch
and combine kernels, the transport and a simulated world of several ranks in one process."""
from mxep.ep.transport.symm_mem.memory import RegionLayout
from mxep.ep.transport.symm_mem.transport import SymmMemTokenState, SymmMemTransport

__all__ = ["RegionLayout", "SymmMemTokenState", "SymmMemTransport"]
