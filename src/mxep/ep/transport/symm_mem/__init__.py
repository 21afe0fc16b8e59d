"""The symmetric-memory transport: memory regions, the counts-flags sync, the plan, the dispatch
and combine kernels, the transport and a simulated world of several ranks in one process."""
from mxep.ep.transport.symm_mem.memory import PeerMemory, RegionLayout
from mxep.ep.transport.symm_mem.transport import SymmMemTransport

__all__ = ["PeerMemory", "RegionLayout", "SymmMemTransport"]
