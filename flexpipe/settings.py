"""The settings a command line offers, and the runtime's own (flexpipe.api.Settings) as flags.

Torch-free on purpose: `flexpipe --help`, `flexpipe serve` and the daemons' parsers read these without
importing the runtime.  `flexpipe serve` (server/cli.py), `flexpipe generate` (cli.py) and `flexpipe
router` (runtime/daemon/cli.py) offer RUNTIME_SETTINGS; tests/test_server_units.py keeps names and
defaults in step with flexpipe.api.Settings.

`resolve_settings` is how `flexpipe serve`, `chat` and `generate` read theirs: the flag, else the
environment variable FLEXPIPE_<NAME>, else the config file (--config or FLEXPIPE_CONFIG, YAML or TOML;
its [COMMAND] table, else its top level), else the default.  Here rather than in server/cli.py, which
needs the 'serve' extra, so that `flexpipe generate` reads them the same way without it.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from flexpipe.errors import ConfigError

# The reshape protocol's KV pre-copy rule (DESIGN.md, reconfiguration), one source for the runtime's
# controller (its keyword defaults) and the simulator, which must not import torch: copy rounds while
# the old epoch serves, at most PRECOPY_MAX_ROUNDS of them, until at most PRECOPY_DELTA_TOKENS tokens
# are left to copy; then the quiesce and the delta copy.
PRECOPY_MAX_ROUNDS = 3
PRECOPY_DELTA_TOKENS = 64


@dataclass(frozen=True)
class Setting:
    """One setting of a command: its flag, environment variable, config key, type and default."""

    name: str
    type: Callable[[str], Any] | type
    default: Any
    help: str
    metavar: str | None = None
    positional: bool = False
    env_prefix: str = "FLEXPIPE_"

    @property
    def env(self) -> str:
        return self.env_prefix + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


# The runtime's own settings (flexpipe.api.Settings), passed to FlexPipe.launch when given; listed
# here rather than read from the dataclass so that no command line parser imports torch.
RUNTIME_SETTINGS = [
    Setting("block_size", int, 16, "tokens per KV block", "N"),
    Setting("num_blocks", int, 1024, "KV blocks per stage (the KV memory of each stage)", "N"),
    Setting("max_batch_tokens", int, 256, "token budget of one micro-batch; chunked prefill fills it", "N"),
    Setting("max_batch_seqs", int, 256, "sequences in one micro-batch at most", "N"),
    Setting("max_inflight", int, 0, "micro-batches in flight at once; 0: one per stage that can compute "
            "in parallel (each GPU; the CPU cores / torch threads for CPU stages)", "N"),
    Setting("dtype", str, "float32", "dtype of weights and activations (float32, bfloat16, float16)"),
    Setting("device", str, "cpu", "device of the stages (cpu, cuda, cuda:N)"),
    Setting("transport", str, "auto", "hop between stage processes: auto (cuda_ipc between CUDA stages of one node, "
            "else the actor message), message, cuda_ipc (or fail), shm"),
    Setting("hop_ring_bytes", int, 64 << 20, "bytes of the ring of each shm or cuda_ipc hop channel (a residual "
            "larger than it goes beside the message; on GPUs the ring is device memory)", "BYTES"),
    Setting("hop_wait_s", float, 10.0, "seconds a step waits for its residual on a shm or cuda_ipc hop channel "
            "before it fails (raised to twice heartbeat_timeout)", "S"),
    Setting("decode_graphs", str, "off", "decode steps of CUDA stages: off (eager), graph (one CUDA graph per batch "
            "and context bucket, replayed), static (the same bucketed buffers without a graph, on any device)"),
    Setting("seed", int, 0, "weights seed of preset models"),
    Setting("torch_threads", int, 1, "torch threads per stage process", "N"),
    Setting("idle_trim_s", float, 5.0, "seconds a stage process goes without a step before it returns the free "
            "heap it keeps for its steps to the kernel (0: never)", "S"),
    Setting("heartbeat_interval", float, 0.5, "seconds between heartbeats of the stage actors", "S"),
    Setting("heartbeat_timeout", float, 3.0, "seconds without a heartbeat before a stage counts as dead", "S"),
    Setting("start_timeout", float, 120.0, "seconds a stage may take to start (load its weights)", "S"),
    Setting("max_queued", int, 4096, "requests waiting at most; beyond, new ones are refused", "N"),
    Setting("rt_priority", int, 0, "SCHED_RR priority (1-99) of every process of the pipeline, for CPU stages that "
            "outnumber the cores; needs CAP_SYS_NICE or ulimit -r; 0: the kernel's default scheduler", "N"),
]


# Settings of the daemons only (not of flexpipe.api.Settings, which a pipeline in one process takes
# too): what the router books for each stage beside its weights and KV, and how often a worker tells
# the router what other tenants use on its devices.  runtime/daemon/cli.py offers them as flags.
ROUTER_SETTINGS = [
    Setting("stage_overhead", str, "auto", "memory booked for each stage beside its weights and KV: its process's "
            "fixed cost on the device (CUDA context and kernels, cuBLAS and activation workspace). auto: 512MiB "
            "on GPUs (an estimate, not a measurement: read a stage process's memory in nvidia-smi and set it), 0 "
            "on CPU devices; or a size, e.g. 1GiB", "BYTES"),
]
WORKER_SETTINGS = [
    Setting("usage_interval", float, 2.0, "seconds between reports to the router of the memory other tenants use "
            "on this worker's GPUs, which placement avoids (0: never; the router then knows only what they used "
            "when this worker joined)", "S"),
]


# --- settings from flags, the environment and a config file ------------------------------------------------
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (use true/false, 1/0, yes/no, on/off)")


def _convert(setting: Setting, value: Any, where: str) -> Any:
    if value is None:
        return None
    try:
        if setting.type is bool:
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if setting.type in (int, float) and isinstance(value, bool):
            raise ValueError("a boolean is not a number")
        return setting.type(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: bad value {value!r} for {setting.name}: {e}") from None


def load_config_file(path: str | os.PathLike[str], section: str) -> dict[str, Any]:
    """Settings of `section` from a YAML or TOML file: its [section] table, else its top level."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text) or {}
    except Exception as e:  # noqa: BLE001 - both parsers' errors become one typed error naming the file
        raise ConfigError(f"config file {p} does not parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of settings")
    if isinstance(data.get(section), dict):
        data = data[section]
    return {str(k).replace("-", "_"): v for k, v in data.items() if not isinstance(v, dict)}


def resolve_settings(settings: list[Setting], args: argparse.Namespace, section: str,
                     environ: dict[str, str] | None = None, shared: Iterable[Setting] = ()) -> dict[str, Any]:
    """Each setting's value: flag, else FLEXPIPE_<NAME>, else config file, else default.

    `section`: the command (`flexpipe SECTION`), whose table of the file it reads.  `shared`: the settings
    of the other commands that may read the same file; a key of theirs in it is not a typo."""
    environ = os.environ if environ is None else environ
    config_path = getattr(args, "config", None) or environ.get("FLEXPIPE_CONFIG")
    from_file = load_config_file(config_path, section) if config_path else {}
    known = {s.name for s in settings}
    unknown = sorted(set(from_file) - known - {s.name for s in shared})
    if unknown:
        raise ConfigError(f"config file {config_path}: unknown setting(s) {', '.join(unknown)} for "
                          f"`flexpipe {section}`; known: {', '.join(sorted(known))}")
    out = {}
    for s in settings:
        value = getattr(args, s.name, None)
        if value is not None:
            out[s.name] = value
        elif s.env in environ:
            out[s.name] = _convert(s, environ[s.env], f"environment variable {s.env}")
        elif s.name in from_file:
            out[s.name] = _convert(s, from_file[s.name], f"config file {config_path}")
        else:
            out[s.name] = s.default
    return out


def add_setting_flags(p: Any, settings: list[Setting], section: str, config_flag: bool = True) -> None:
    """A flag (or positional) of each setting on parser or group `p`, whose help names its environment
    variable and config key; and --config FILE unless `config_flag` is false.  Every flag defaults to None
    (not given), which resolve_settings tells from a value given."""
    for s in settings:
        where = f"env {s.env}; config key '{s.name}'"
        default = "" if s.default is None else f"; default {s.default!r}"
        help_ = f"{s.help} ({where}{default})".replace("%", "%%")
        if s.positional:
            p.add_argument(s.name, nargs="?", default=None, metavar=s.metavar, help=help_)
        elif s.type is bool:
            p.add_argument(s.flag, dest=s.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(s.flag, dest=s.name, type=s.type, default=None, metavar=s.metavar, help=help_)
    if not config_flag:
        return
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"YAML or TOML file of settings, at its top level or under a [{section}] table "
                        "(env FLEXPIPE_CONFIG)")
