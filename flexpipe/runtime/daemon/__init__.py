"""The router daemon and the worker daemon: `flexpipe router` and `flexpipe worker`.

    flexpipe router --bind tcp://10.0.0.5:5555 --model tiny --stages 2 --min-workers 2
    flexpipe worker --router tcp://10.0.0.5:5555 --devices cpu:0,cpu:1 --memory 2GB   # on each host

The router is one process: an ActorSystem bound on tcp; the *frontend* actor at --bind, which
clients (runtime/remote.py) and workers talk to; the allocator (AllocatorBehaviour), to which each
worker's devices are announced; and, once --min-workers have joined, the pipeline: Controller and
RouterActor unchanged, with a stage launcher that asks a worker to start each stage.  Stages are
placed round-robin over the workers' devices (a stage that overlaps a running one stays on its
device), and each holds an allocator reservation for its weights and KV while it runs.

A worker announces its devices (GPUs via pynvml, or CPU "devices" with a memory budget), starts
each stage as a process of its own (an ActorSystem.launch, so the stage's ref is a tcp endpoint
every peer can reach), stops or kills it when asked, and tells the router at once when one exits
unasked.  Every --usage-interval seconds it tells the router what uses its GPUs' memory
(DeviceUsage), and the router books other tenants' share in the allocator, so that placement works
from live free memory.  Each stage books its weights, its KV pool and its process's overhead on the
device (--stage-overhead).  The router and each worker watch each other with heartbeats; a worker
whose router goes away stops its stages and joins again when the router is back, listing the stages
it still runs: it stops those the router does not know (JoinReply.stop).

Logs are one line per event, key=value (or JSON with --log-format json).  On SIGTERM the router
stops admitting, gives running requests --drain-timeout seconds to finish and ends the rest with
finish_reason "shutdown", stops the stages through their workers, closes every socket and exits 0.
Worker protocol: kinds 300-329 (the client protocol, 330-349, is in runtime/remote.py).
"""

from flexpipe.runtime.daemon.cli import add_daemon_parsers, main
from flexpipe.runtime.daemon.devices import assign_devices, local_devices
from flexpipe.runtime.daemon.router import RouterDaemon
from flexpipe.runtime.daemon.worker import WorkerDaemon

__all__ = ["RouterDaemon", "WorkerDaemon", "add_daemon_parsers", "assign_devices", "local_devices", "main"]

