"""Live GPU inventory of one node through NVML: free memory, utilisation, NVLink wiring, fed to the allocator.

A worker announces its GPUs once (`Inventory.cluster()` -> `AllocatorCore.announce` or the
`AnnounceGpus` message) and then reports, every interval, how much memory other tenants use
(`Inventory.report()` -> `AllocatorCore.report` or `ReportUsage`). "Other tenants" is every process
on the GPU except this worker's own (its stage processes, `own_pids`): the allocator books our
memory through reservations, not through NVML, and `others_use` is the one rule that turns NVML's
figures and those reservations into what is booked as theirs.  The worker daemon samples
(`Inventory.sample`, with every process under it as its own: `process_tree`, and the pids of its
live stages as processes NVML must list: `expected`) and sends what it saw, per stage too, to the
router daemon, which knows each stage's reservation and books `others_use` of each GPU
(runtime/daemon).

Everything that reads NVML takes the module as an argument (`nvml`), so tests drive these functions
with a fake module object; by default it is `pynvml` (the nvidia-ml-py package), imported lazily.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Mapping

from flexpipe.errors import NoDriverError
from flexpipe.placement.topology import (
    GB, GPU_MODELS, LinkKind, Node, Topology, make_gpu, model_from_nvml_name,
)

__all__ = ["GpuSample", "Inventory", "sample_gpus", "nvlink_wiring", "local_topology", "external_used",
           "others_use", "process_tree", "load_nvml"]

log = logging.getLogger("flexpipe.inventory")

# nvmlDeviceGetTopologyCommonAncestor levels (NVML_TOPOLOGY_*) -> link kinds
_LEVELS = {0: LinkKind.SAME, 10: LinkKind.PCIE_SWITCH, 20: LinkKind.PCIE_SWITCH, 30: LinkKind.PCIE_HOST,
           40: LinkKind.PCIE_HOST, 50: LinkKind.PCIE_CROSS_SOCKET}


def load_nvml() -> Any:
    """The pynvml module, initialised (NoDriverError when it or the driver is missing)."""
    try:
        import pynvml
    except ImportError as e:
        raise NoDriverError("pynvml is not installed (pip install nvidia-ml-py, or the flexpipe[gpu] extra)") from e
    try:
        pynvml.nvmlInit()
    except Exception as e:   # library not found / driver not loaded: no usable driver either way
        raise NoDriverError(f"no NVIDIA driver found ({e})") from e
    return pynvml


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


@dataclass(slots=True)
class GpuSample:
    """One GPU at one moment, as NVML sees it."""

    index: int
    uuid: str
    name: str
    bus_id: str
    total: int                      # bytes
    free: int
    used: int                       # by every process (and the driver)
    used_by_us: int | None          # by `own_pids`; None when NVML cannot attribute memory to our processes
    util: float | None              # SM busy share over NVML's last sample period, 0..1 (None: unsupported)
    mem_util: float | None          # memory-controller busy share, 0..1
    processes: dict[int, int | None] = field(default_factory=dict)   # pid -> bytes (None: unknown)


def _processes(nvml: Any, h: Any) -> dict[int, int | None] | None:
    try:
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(h)
    except Exception:   # not supported here (some vGPU / MIG setups): memory cannot be attributed
        return None
    out: dict[int, int | None] = {}
    for p in procs:
        used = getattr(p, "usedGpuMemory", None)
        out[int(p.pid)] = None if used is None else int(used)
    return out


def sample_gpus(nvml: Any, own_pids: Iterable[int] = (),
                expected: Mapping[int, Iterable[int]] | None = None) -> list[GpuSample]:
    """Memory, utilisation and processes of every GPU NVML lists (nvmlInit must have been called).

    `expected`: per GPU index, pids of ours that hold memory there for certain (a worker's live stage
    processes on that GPU).  Where NVML's process list lacks one of them, NVML lists processes under
    pids we cannot match (a container without the host's PID namespace sees none of its own, or
    other numbers): what ours use is then unknown (None), not 0, which would count every byte of our
    stages as another tenant's on top of their reservations.
    """
    own = set(own_pids)
    must = {int(i): {int(p) for p in ps} for i, ps in (expected or {}).items()}
    out = []
    for i in range(int(nvml.nvmlDeviceGetCount())):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        mem = nvml.nvmlDeviceGetMemoryInfo(h)
        util: float | None
        mem_util: float | None
        try:
            rates = nvml.nvmlDeviceGetUtilizationRates(h)
            util, mem_util = float(rates.gpu) / 100.0, float(rates.memory) / 100.0
        except Exception:   # not supported on every product; utilisation is advisory
            util = mem_util = None
        procs = _processes(nvml, h)
        if procs is None:
            ours = None
        elif any(procs.get(p, 0) is None for p in own if p in procs) or not must.get(i, set()) <= procs.keys():
            ours = None
        else:
            ours = sum(v for p, v in procs.items() if p in own and v is not None)
        out.append(GpuSample(i, _s(nvml.nvmlDeviceGetUUID(h)), _s(nvml.nvmlDeviceGetName(h)),
                             _s(nvml.nvmlDeviceGetPciInfo(h).busId).lower(), int(mem.total), int(mem.free),
                             int(mem.used), ours, util, mem_util, procs or {}))
    return out


def nvlink_wiring(nvml: Any, bus_ids: list[str]) -> tuple[dict[tuple[int, int], int], list[int]]:
    """Active NVLinks: (i, j) -> links between local GPUs i < j, and per GPU the links to an NVSwitch."""
    pairs: dict[tuple[int, int], int] = {}
    switch = [0] * len(bus_ids)
    max_links = int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))
    for i in range(len(bus_ids)):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        for lk in range(max_links):
            try:
                if not nvml.nvmlDeviceGetNvLinkState(h, lk):
                    continue
                peer = _s(nvml.nvmlDeviceGetNvLinkRemotePciInfo(h, lk).busId).lower()
            except Exception:   # no link of that index on this product (or no NVLink at all)
                break
            if peer in bus_ids and bus_ids.index(peer) != i:
                j = bus_ids.index(peer)
                if i < j:   # each link is seen from both ends: count it once
                    pairs[(i, j)] = pairs.get((i, j), 0) + 1
            elif peer not in bus_ids:
                switch[i] += 1
    return pairs, switch


def local_topology(nvml: Any, node: str | None = None, rack: str = "r0", own_pids: Iterable[int] = ()) -> Topology:
    """This node as a Topology: GPUs, free memory (ours counted as free), utilisation, link kinds."""
    node = node or socket.gethostname()
    samples = sample_gpus(nvml, own_pids)
    n = len(samples)
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
    gpus, free, busy = [], [], []
    for s in samples:
        key = model_from_nvml_name(s.name)
        kw: dict[str, Any] = {"memory_bytes": s.total, "uuid": s.uuid}
        if key not in GPU_MODELS:   # an unknown product: its memory is known, its peaks are not
            kw.update(peak_flops=100e12, mem_bw=1000 * GB, compute_class="unknown")
        gpus.append(make_gpu(node, s.index, key, **kw))
        free.append(min(s.total, s.free + (s.used_by_us or 0)))
        busy.append(min(0.95, s.util or 0.0))
    links: dict[tuple[int, int], LinkKind] = {}
    for i in range(n):
        for j in range(i + 1, n):
            try:
                level = int(nvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j]))
            except Exception:
                level = 50
            links[(i, j)] = _LEVELS.get(level, LinkKind.PCIE_CROSS_SOCKET)
    pairs, switch = nvlink_wiring(nvml, [s.bus_id for s in samples])
    for (i, j) in pairs:
        links[(i, j)] = LinkKind.NVLINK
    for i, k in enumerate(switch):
        if k:
            gpus[i].nvlink_domain = 0   # every GPU wired to the NVSwitch fabric reaches the others over it
    for (i, j) in list(links):
        if switch[i] and switch[j]:
            links[(i, j)] = LinkKind.NVLINK
    return Topology([Node(node, rack, gpus, links)], name=node, free=free, busy=busy)


def external_used(samples: list[GpuSample], node: str, reserved: Mapping[str, int] | None = None) -> dict[str, int]:
    """Bytes to book as other tenants' per GPU id ("node/index"), what AllocatorCore.report takes:
    `others_use` of each GPU, with `reserved` the allocator's reservations for us (a GPU it does not
    list: none there); None: not known, our processes' use is taken as booked."""
    out = {}
    for s in samples:
        gid = f"{node}/{s.index}"
        out[gid] = others_use(s.used, s.used_by_us, None if reserved is None else int(reserved.get(gid, 0)))
    return out


def others_use(used: int, ours: int | None, reserved: int | None,
               stages: Iterable[tuple[int, int]] = ()) -> int:
    """Bytes to book as other tenants' on one GPU, beside our reservations there (`reserved`): the one
    rule for it (the router daemon's usage reports and `external_used` both apply it).

    The allocator counts free = total - this - reserved, so this is `used` less the part of it that
    `reserved` already accounts for:
      used - min(ours, reserved)  normally.  While our processes use no more than we booked (ours <=
                                  reserved) that is used - ours, what other processes use: nothing is
                                  counted twice.  What ours use beyond what we booked (a stage over its
                                  estimate, the process of a start we gave up on and booked nothing for)
                                  is in use all the same: it stays here, not free.
      used - sum over our stages s of min(ours_s, reserved_s), and min() of the rest
                                  where NVML's figures are known per stage (`stages`: what each of our
                                  stages' processes use there, and what we booked for it; `ours` and
                                  `reserved` include theirs).  The same rule, stage by stage: on a
                                  device's totals a stage under its booking hid another's overrun,
                                  which was then booked as nobody's.  What ours use beside those
                                  stages (one still starting, a stray process) is held against what is
                                  booked beside them (the starts in flight), as a whole.
      used - reserved             where NVML cannot attribute memory to our processes (`ours` None: no
                                  per-process figures, or a live stage's pid missing from NVML's list,
                                  as in a container without the host's PID namespace): our reservations
                                  stand in for what ours use.
      used - ours                 where the reservations are not known (`reserved` None).
    Never below 0."""
    if ours is None:
        mine = int(reserved or 0)
    elif reserved is None:
        mine = int(ours)
    else:
        mine, rest_use, rest_booked = 0, int(ours), int(reserved)
        for use, booked in stages:
            mine += min(int(use), int(booked))
            rest_use, rest_booked = rest_use - int(use), rest_booked - int(booked)
        mine += min(max(0, rest_use), max(0, rest_booked))
    return max(0, int(used) - mine)


def process_tree(pid: int) -> set[int]:
    """`pid` and every process descended from it (Linux /proc; only `pid` where /proc cannot tell).

    A worker's own processes on a GPU: its stage processes, including one that is still starting and
    already holds a CUDA context, which is ours, not another tenant's."""
    out, todo = {pid}, [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:   # not Linux, or the process ended meanwhile
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = {int(c) for c in f.read().split()}
            except (OSError, ValueError):   # a thread that ended, or a kernel without the file
                continue
            todo.extend(kids - out)
            out |= kids
    return out


class Inventory:
    """The live inventory of this node: announce once, then report usage on every poll."""

    def __init__(self, nvml: Any = None, *, node: str | None = None, worker: str | None = None, rack: str = "r0",
                 own_pids: Callable[[], Iterable[int]] | Iterable[int] | None = None):
        self._nvml = nvml
        self._owns_nvml = nvml is None
        self.node = node or socket.gethostname()
        self.worker = worker or f"{self.node}-{os.getpid()}"
        self.rack = rack
        self._own = own_pids if own_pids is not None else (os.getpid(),)
        self.last: list[GpuSample] = []

    @property
    def nvml(self) -> Any:
        if self._nvml is None:
            self._nvml = load_nvml()
        return self._nvml

    def close(self) -> None:
        """Shut NVML down if this inventory initialised it."""
        if self._owns_nvml and self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception as e:   # a failing shutdown must not hide the caller's own error
                log.warning("nvmlShutdown failed: %s", e)
            self._nvml = None

    def own_pids(self) -> set[int]:
        own = self._own() if callable(self._own) else self._own
        return {int(p) for p in own}

    def cluster(self) -> dict:
        """This node's description (Topology.to_dict), what AnnounceGpus carries."""
        return local_topology(self.nvml, self.node, self.rack, self.own_pids()).to_dict()

    def sample(self, own_pids: Iterable[int] | None = None,
               expected: Mapping[int, Iterable[int]] | None = None) -> list[GpuSample]:
        """A fresh sample of every GPU (kept in `last`); `own_pids`: our processes this time, instead of
        the inventory's own (a caller off the event loop passes what it read on the loop); `expected`:
        per GPU index, our processes NVML must list there (`sample_gpus`)."""
        self.last = sample_gpus(self.nvml, self.own_pids() if own_pids is None else own_pids, expected)
        return self.last

    def report(self, reserved: Mapping[str, int] | None = None) -> dict[str, int]:
        """Memory other tenants use per GPU id, from a fresh sample (what ReportUsage carries)."""
        return external_used(self.sample(), self.node, reserved)

    def utilisation(self) -> dict[str, float]:
        """SM busy share per GPU id from the last sample (GPUs that do not report it are left out)."""
        return {f"{self.node}/{s.index}": s.util for s in self.last if s.util is not None}

    def announce_to(self, core: Any) -> list[str]:
        """Announce this node's GPUs to an AllocatorCore; returns their ids."""
        return core.announce(self.worker, self.cluster())

    def report_to(self, core: Any) -> dict[str, int]:
        """Report other tenants' usage to an AllocatorCore (our reservations excluded)."""
        usage = self.report({g: b for g, b in core.reserved.items() if g.startswith(f"{self.node}/")})
        core.report(usage)
        return usage

    async def run(self, send: Callable[[dict[str, int]], Awaitable[Any]], interval: float = 1.0,
                  reserved: Callable[[], Mapping[str, int]] | None = None) -> None:
        """Report every `interval` seconds through `send` (e.g. a tell of ReportUsage) until cancelled.

        NVML calls take milliseconds, so each sample runs in a worker thread, off the event loop.
        """
        while True:
            usage = await asyncio.to_thread(self.report, reserved() if reserved else None)
            await send(usage)
            await asyncio.sleep(interval)
