"""The collective transport (torch.distributed all-to-all; gloo on CPU, or any NCCL group)."""
from mxep.ep.transport.collective.transport import CollectiveTransport

__all__ = ["CollectiveTransport"]
