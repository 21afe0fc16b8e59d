"""Transports behind one protocol (:class:`~mxep.ep.transport.base.Transport`), one subpackage each."""
from mxep.ep.transport.base import DispatchHandle, Transport

__all__ = ["DispatchHandle", "Transport"]
