"""The NVSHMEM transport: the token-level dispatch and combine over one exchange of whole rows
(``all_to_all_vdev`` on PyTorch's NVSHMEM symmetric memory, across nodes), with the
symmetric-memory transport's layout and bits; its exchange has stand-ins for one rank and for
gloo, and a simulated world runs several ranks in one process."""
from mxep.ep.transport.nvshmem.exchange import make_exchange, nvshmem_available
from mxep.ep.transport.nvshmem.transport import NvshmemTokenState, NvshmemTransport

__all__ = ["NvshmemTokenState", "NvshmemTransport", "make_exchange", "nvshmem_available"]
