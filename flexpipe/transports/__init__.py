"""Moving tensors between actors: one `Transport` interface, one kind per pair of endpoints.

    kind      pair                                   module
    local     same process: the tensor itself        local.py
    shm       same host: a shared-memory ring        shm.py
    ipc       same host: ZeroMQ frames over ipc      zmq.py
    tcp       other hosts: ZeroMQ frames over tcp    zmq.py
    cuda_ipc  same node, GPU to GPU                  cuda_ipc.py (FP-10, registers itself)
    nccl      across nodes, GPU                      nccl.py (FP-10, registers itself)

`choose_transport(src, dst)` names the kind; `open_receiver(kind)` opens the receiving side,
whose `.address` the sender passes to `open_sender(address)`. See base.py.
"""

from __future__ import annotations

from flexpipe.transports.base import (
    Endpoint, Transport, check_into, choose_transport, open_receiver, open_sender,
    register_transport,
)
from flexpipe.transports.local import LocalTransport
from flexpipe.transports.shm import ShmTransport
from flexpipe.transports.zmq import ZmqTransport

__all__ = ["Endpoint", "Transport", "choose_transport", "open_receiver", "open_sender",
           "register_transport", "check_into", "LocalTransport", "ShmTransport", "ZmqTransport"]

register_transport("local", LocalTransport.listen, LocalTransport.connect)
register_transport("shm", ShmTransport.listen, ShmTransport.connect)
register_transport("ipc", lambda **kw: ZmqTransport.listen("ipc", **kw), ZmqTransport.connect)
register_transport("tcp", lambda **kw: ZmqTransport.listen("tcp", **kw), ZmqTransport.connect)

# The GPU kinds register themselves on import; both import CuPy lazily, so this is safe without CUDA.
import flexpipe.transports.cuda_ipc  # noqa: E402,F401
import flexpipe.transports.nccl  # noqa: E402,F401
