"""A worker's devices, and the device of each stage of a pipeline shape."""

from __future__ import annotations

import collections
import math
import os
import socket
from typing import Any, Callable, Mapping, Sequence

from flexpipe.errors import ConfigError, NoDriverError, PlacementError


# --- devices ---------------------------------------------------------------------------------------------
CPU_MEMORY_DEFAULT = 2 * 2**30


def cuda_ordinals(nvml_indices: Sequence[int], visible: str | None) -> dict[int, int]:
    """The CUDA device number (what torch's cuda:N means) of each NVML GPU index this process can use.

    NVML numbers every GPU of the machine; CUDA numbers only those in CUDA_VISIBLE_DEVICES, in its
    order.  With the variable unset every GPU is visible and the numbers agree (NVML's PCI bus order;
    set CUDA_DEVICE_ORDER=PCI_BUS_ID where GPUs of different models would otherwise be reordered).
    Indices only: a GPU UUID or MIG name in the variable is refused with what to write instead.
    """
    if visible is None:
        return {i: i for i in nvml_indices}
    out: dict[int, int] = {}
    for pos, item in enumerate(x.strip() for x in visible.split(",")):
        if not item:
            break   # CUDA stops at the first empty entry
        if not item.lstrip("-").isdigit():
            raise ConfigError(f"CUDA_VISIBLE_DEVICES={visible!r}: a worker maps GPUs by index; write indices "
                              "(e.g. 0,2), not UUIDs or MIG names")
        i = int(item)
        if i < 0 or i not in nvml_indices:
            break   # CUDA ignores this entry and every one after it
        out.setdefault(i, len(out))
    return out


def check_memory(memory: Any, given: Any = None) -> int | None:
    """--memory as bytes: None (the default budget), or a positive byte count (`given`: what the user
    wrote, for the message).  0 used to pass for "unset" (`memory or default`): a worker told to
    offer nothing offered 2 GiB per device."""
    if memory is None:
        return None
    if isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0:
        raise ConfigError(f"--memory {memory if given is None else given!r}: give a positive size, e.g. 2GB or "
                          f"512MiB (leave it unset for {CPU_MEMORY_DEFAULT / 2**30:g} GiB per CPU device, and all "
                          "of each GPU's free memory)")
    return memory


def parse_devices(devices: str) -> tuple[str, set[int]]:
    """--devices as (kind, indices): kind "auto", "cpu" or "cuda"; the N of each KIND:N entry (none: a
    bare kind).  Refused with a ConfigError: a mix of kinds, and an index that is no number >= 0 (cpu:x
    was a ValueError's traceback, and cpu:-1 a device)."""
    items = [d.strip() for d in devices.split(",") if d.strip()] or ["auto"]
    kinds = {d.partition(":")[0] for d in items}
    if not kinds <= {"auto", "cpu", "cuda"} or len(kinds) > 1:
        raise ConfigError(f"--devices {devices!r}: give 'auto', or CPU devices (cpu, cpu:0,cpu:1), or GPUs "
                          f"(cuda, cuda:0,cuda:1), not a mix")
    indices: set[int] = set()
    for item in items:
        kind, colon, index = item.partition(":")
        if not colon:
            continue
        if not (index.isascii() and index.isdigit()):   # (no sign: cpu:-1 is refused too)
            raise ConfigError(f"--devices {devices!r}: {item!r} is not {kind}:N with N a device index >= 0 "
                              f"(e.g. {kind}:0,{kind}:1)")
        indices.add(int(index))
    return kinds.pop(), indices


def local_devices(devices: str = "auto", node: str = "", memory: int | None = None) -> tuple[Any, dict[int, str]]:
    """This worker's devices as a Topology of one node, and the torch device of each local index.

    devices: "auto" (GPUs via pynvml, else one CPU device), "cpu", "cpu:0,cpu:1", "cuda", "cuda:0,cuda:2".
    memory: the budget of each CPU device (None: 2 GiB); for a GPU, a cap on what it offers.
    """
    from flexpipe.placement.topology import Node, Topology, discover_local, make_gpu

    memory = check_memory(memory)
    kind, indices = parse_devices(devices)
    node = node or socket.gethostname()
    if kind in ("auto", "cuda"):
        try:
            topo = discover_local(node)
        except NoDriverError:
            if kind == "cuda":
                raise
            topo = None
        if topo is not None and len(topo.gpus):
            ordinal = cuda_ordinals([g.index for g in topo.gpus], os.environ.get("CUDA_VISIBLE_DEVICES"))
            want = indices or set(ordinal)
            missing = want - {g.index for g in topo.gpus}
            if missing:
                raise ConfigError(f"--devices {devices!r}: this machine has no GPU {sorted(missing)}")
            hidden = want - set(ordinal)
            if hidden:
                raise ConfigError(f"--devices {devices!r}: GPU {sorted(hidden)} (NVML index) is not in "
                                  f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}")
            keep = [i for i, g in enumerate(topo.gpus) if g.index in want]
            nd = topo.nodes[0]
            gpus = [topo.gpus[i] for i in keep]
            free = [min(int(topo.free[i]), memory) if memory is not None else int(topo.free[i]) for i in keep]
            links = {k: v for k, v in nd.links.items() if k[0] in want and k[1] in want}
            t = Topology([Node(node, nd.rack, gpus, links)], name=node, free=free)
            return t, {g.index: f"cuda:{ordinal[g.index]}" for g in gpus}
        if kind == "cuda":
            raise NoDriverError("--devices cuda: no GPU found on this machine")
        indices = {0}   # auto, and no GPU: one CPU device
    idx = sorted(indices or {0})
    budget = CPU_MEMORY_DEFAULT if memory is None else memory
    gpus = [make_gpu(node, i, "cpu", memory_bytes=budget, peak_flops=5e10, mem_bw=2e10, compute_class="cpu")
            for i in idx]
    return Topology([Node(node, "r0", gpus)], name=node), {i: "cpu" for i in idx}


def parse_stage_overhead(text: str | int | None) -> int | None:
    """--stage-overhead: None for "auto" (the device's default: `stage_overhead`), else bytes >= 0."""
    from flexpipe.errors import PartitionError
    from flexpipe.partition import parse_bytes

    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return None
    try:
        n = -1 if isinstance(text, bool) else parse_bytes(text)
    except PartitionError:
        n = -1
    if n < 0:
        raise ConfigError(f"--stage-overhead {text!r}: give auto, or the memory each stage's process holds beside "
                          "its weights and KV, e.g. 512MiB, 1GiB or 0")
    return n


def stage_overhead(setting: int | None, device_kind: str) -> int:
    """Bytes booked per stage beside its weights and KV: `setting` when given; else, on GPUs, the placer's
    estimate of a process's CUDA context and workspace (STAGE_OVERHEAD_BYTES), and nothing on CPU
    devices (their --memory is a budget for what stages book, not a process's whole footprint)."""
    from flexpipe.placement.placer import STAGE_OVERHEAD_BYTES

    if setting is not None:
        return setting
    return STAGE_OVERHEAD_BYTES if device_kind == "cuda" else 0


def stage_request(cfg: Any, settings: Any, overhead: int) -> Any:
    """The placer's ReplicaRequest for the stages of a pipeline: its `stage_bytes(start, end)` is the memory a
    stage of units [start, end) holds (parameters, its KV pool, `overhead`), the one figure the placer,
    the router's placement and its reservations use."""
    from flexpipe.placement.placer import request_for_model

    dtype_bytes = {"float32": 4}.get(settings.dtype, 2)
    return request_for_model(cfg, dtype_bytes, kv_tokens=settings.num_blocks * settings.block_size,
                             batch_tokens=settings.max_batch_tokens, stage_overhead_bytes=overhead)


def assign_devices(ranges: Sequence[tuple[int, int]], needs: Sequence[int], order: Sequence[str],
                   free: dict[str, int], previous: Sequence[tuple[int, int, str]] = (),
                   size: Callable[[int, int], int] | None = None,
                   overhead: Mapping[str, int] | None = None) -> list[str]:
    """The device of each stage of a new shape.

    A stage that overlaps a running stage stays on that stage's device (largest overlap first; a
    running stage keeps one new stage at most, a device at most its fair share) so that the
    controller keeps it in place, if the device has the memory the stage grows by there: the units
    it does not hold yet (`size(start, end)`: bytes of units [start, end), parameters and KV; by
    default `needs` pro rata of units), which it holds beside its old ones until the switch. Every
    other stage goes to the device with the fewest stages that has the memory, in `order` (devices
    interleaved across workers, so stages spread over them). `free` excludes what running stages hold.
    `overhead`: per device, what a stage's process books there beside `needs` (a new stage on device d
    needs needs[j] + overhead[d]: GPUs and CPU devices differ); a kept stage's process runs already.
    """
    n = len(ranges)
    if not order:
        raise PlacementError("no devices: no worker has joined")
    free = dict(free)
    extra = dict(overhead or {})
    fair = math.ceil(n / len(order))
    count: collections.Counter[str] = collections.Counter()
    out: list[str | None] = [None] * n
    pairs = sorted(((min(e, pe) - max(s, ps), j, i) for j, (s, e) in enumerate(ranges)
                    for i, (ps, pe, pd) in enumerate(previous) if pd in free and min(e, pe) > max(s, ps)),
                   reverse=True)
    def growth(j: int, i: int) -> int:
        (s, e), (ps, pe, _) = ranges[j], previous[i]
        lo, hi = max(s, ps), min(e, pe)
        if size is not None:
            return size(s, e) - size(lo, hi)
        return needs[j] * ((e - s) - (hi - lo)) // (e - s)

    kept: set[int] = set()
    for _, j, i in pairs:
        d = previous[i][2]
        if out[j] is None and i not in kept and count[d] < fair and free[d] >= growth(j, i):
            out[j], count[d] = d, count[d] + 1
            free[d] -= growth(j, i)
            kept.add(i)
    for j in range(n):
        if out[j] is not None:
            continue
        fits = [d for d in order if free.get(d, 0) >= needs[j] + extra.get(d, 0)]
        if not fits:
            best = max(free.values(), default=0)
            lo, hi = (f(needs[j] + extra.get(d, 0) for d in order) for f in (min, max))
            text = f"{lo / 2**20:.1f} MiB" + (f" ({hi / 2**20:.1f} MiB with its process's overhead on a GPU)"
                                                 if hi > lo else "")
            raise PlacementError(f"stage {j} (units [{ranges[j][0]},{ranges[j][1]})) needs {text}; the most any "
                                 f"device has free is {best / 2**20:.1f} MiB: add workers or memory (--memory), or "
                                 f"use fewer KV blocks")
        d = min(fits, key=lambda x: (count[x], order.index(x)))
        out[j] = d
        count[d] += 1
        free[d] -= needs[j] + extra.get(d, 0)
    return out  # type: ignore[return-value]
