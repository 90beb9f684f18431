"""The settings a command line offers, and the runtime's own (flexpipe.api.Settings) as flags.

Torch-free, and free of the optional extras, on purpose: `flexpipe --help`, `flexpipe serve` and the
daemons' parsers read these without importing the runtime, and every command that reads a config file
knows every other one's settings (COMMAND_SETTINGS), whichever extras are installed.  `flexpipe serve`
(server/cli.py), `flexpipe generate` (cli.py) and `flexpipe router` (runtime/daemon/cli.py) offer
RUNTIME_SETTINGS; tests/test_server_units.py keeps names and defaults in step with flexpipe.api.Settings.

`resolve_settings` is how `flexpipe serve`, `chat`, `generate`, `router` and `worker` read theirs: the
flag, else the environment variable (FLEXPIPE_<NAME>, or a command's own prefix), else the config file
(--config or FLEXPIPE_CONFIG, YAML or TOML; its [COMMAND] table, else its top level), else the default.
One file may serve every command: at its top level a key of another command's is left to that command;
a key no command takes, or a table no command reads, is refused.  At the top level a key means what its
variable FLEXPIPE_<KEY> means: a command whose setting of that name reads a variable of its own, because
it means something else there (chat's model and seed, the worker's host and heartbeats), takes it from
its own table only, and leaves the file's top-level key to the command it is meant for.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    choices: tuple[str, ...] | None = None

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
    Setting("max_message_bytes", int, 1 << 30, "largest message the pipeline's actors (its router and every stage "
            "process) send or take; a reshape's weight and KV copies go in pieces under it", "BYTES"),
]


# --- the settings of each command that reads a config file ------------------------------------------------
# Declared here, not with their commands, so that each command knows the others' keys (COMMAND_SETTINGS):
# server/cli.py needs the 'serve' extra, runtime/daemon/cli.py imports torch.
SERVE_SETTINGS = [
    Setting("model", str, "tiny", "model to serve: a preset name or a Hugging Face checkpoint directory",
            "MODEL", positional=True),
    Setting("host", str, "127.0.0.1", "address to listen on (0.0.0.0 for every interface)"),
    Setting("port", int, 8000, "TCP port to listen on"),
    Setting("stages", int, 2, "pipeline stages to start with (the runtime reshapes from there)"),
    Setting("in_process", bool, False, "run the stages in this process instead of one process each"),
    Setting("api_key", str, None, "require 'Authorization: Bearer KEY' on every /v1 route (the chat page "
            "asks for it)", "KEY"),
    Setting("served_model_name", str, None, "model name clients send and /v1/models lists (default: the "
            "model's own name)", "NAME"),
    Setting("chat_template", str, None, "jinja2 chat template, as a file (.jinja, or a tokenizer_config.json) "
            "or inline text; default: the checkpoint's, else a plain 'Role: text' template", "TEMPLATE"),
    Setting("default_max_tokens", int, None, "tokens to generate when a request names no max_tokens "
            "(default: 16 for completions, the rest of the context for chat)", "N"),
    Setting("access_log", bool, False, "log every HTTP request"),
    Setting("router", str, None, "serve through a running `flexpipe router` at tcp://HOST:PORT (or ipc:///PATH) "
            "instead of starting a pipeline here (MODEL, --stages and the runtime settings are the router's); "
            "CURVE key files from FLEXPIPE_CURVE_*", "URL"),
    Setting("router_timeout", float, 30.0, "with router: seconds to wait for the router's first answer before "
            "giving up with an error", "S"),
    Setting("router_ready_timeout", float, 600.0, "with router: seconds, from the start, to wait for a router "
            "that answers to serve (its workers joined, its stages started: large weights take minutes to "
            "load) before giving up with an error that says what it is waiting for", "S"),
    Setting("autoscale", bool, False, "let the control loop reshape and scale the pipeline by itself from the "
            "traffic it sees (runtime/autoscale.py; its decisions show in /v1/flexpipe/status)"),
    Setting("graceful_shutdown_s", float, 10.0, "on SIGTERM/SIGINT, seconds running requests get to finish; "
            "streams still running then end with a 'server_shutdown' error event and [DONE]", "S"),
    Setting("body_timeout_s", float, 30.0, "seconds a request's body may take to arrive whole; a slower one "
            "is answered 408 (a client that stalls mid-body holds its connection no longer)", "S"),
    Setting("allowed_origins", str, None, "comma-separated origins (or *) whose web pages may call the API "
            "from a browser (CORS); default: none but the server's own chat page", "ORIGINS"),
]


def _prefixed(prefix: str) -> Callable[..., Setting]:
    """Settings read from FLEXPIPE_<PREFIX>_<NAME>: those whose plain variable another command reads with
    another meaning (serve's FLEXPIPE_MODEL, FLEXPIPE_HOST), so that a shell set up for one command does
    not steer the other."""
    def make(name: str, type_: Callable[[str], Any] | type, default: Any, help_: str, metavar: str | None = None,
             **kw: Any) -> Setting:
        return Setting(name, type_, default, help_, metavar, env_prefix=f"FLEXPIPE_{prefix}_", **kw)
    return make


# The URL and key are shared with `flexpipe serve` (FLEXPIPE_URL, FLEXPIPE_API_KEY); the rest read
# FLEXPIPE_CHAT_*, so that a shell set up for the server does not steer the client (and back).
_chat = _prefixed("CHAT")
CHAT_SETTINGS = [
    Setting("url", str, "http://127.0.0.1:8000", "base URL of a running `flexpipe serve`"),
    Setting("api_key", str, None, "the server's API key, if it has one", "KEY"),
    _chat("model", str, None, "model name to ask for (default: the first one the server lists)", "NAME"),
    _chat("system", str, None, "system message that starts the conversation", "TEXT"),
    _chat("max_tokens", int, 128, "tokens to generate per answer", "N"),
    _chat("temperature", float, 0.7, "sampling temperature (0 = greedy)", "T"),
    _chat("top_p", float, 1.0, "nucleus sampling mass", "P"),
    _chat("seed", int, None, "sampling seed, for answers that repeat", "N"),
    _chat("message", str, None, "send this one message, print the answer and exit (no prompt)", "TEXT"),
]

# The runtime settings `flexpipe generate` offers: all but the presets' weights seed, whose name the
# sampling seed has there (so FLEXPIPE_SEED, serve's weights seed, is not read either).  Its other flags
# (the prompt, the model, sampling) are the command line's only.
GENERATE_SETTINGS = [s for s in RUNTIME_SETTINGS if s.name != "seed"]

_LOG_FORMAT = Setting("log_format", str, "kv", "log lines as key=value (kv) or JSON (json)", "FORMAT",
                      choices=("kv", "json"))

# `flexpipe router`'s own settings; the model and its stages read FLEXPIPE_MODEL / FLEXPIPE_STAGES as
# `flexpipe serve`'s do (they mean the same), the rest FLEXPIPE_ROUTER_* (FLEXPIPE_ROUTER_BIND as before).
_router = _prefixed("ROUTER")
ROUTER_SETTINGS = [
    _router("bind", str, "tcp://127.0.0.1:5555", "tcp://HOST:PORT for clients and workers (PORT 0: a free port, "
            "logged in the 'listening' event), or ipc:///PATH when all run on this host", "URL"),
    _router("advertise", str, None, "address peers reach this router at (default: the --bind host, or this "
            "machine's address when it binds every interface)", "HOST"),
    Setting("model", str, "tiny", "preset name or HF checkpoint directory", "MODEL"),
    Setting("stages", int, 2, "pipeline stages to start with", "N"),
    _router("boundaries", str, None, "explicit stage boundaries (unit indices) instead of --stages",
            "0,A,B,...,N"),
    _router("min_workers", int, 1, "workers that must join before the pipeline starts", "N"),
    _router("drain_timeout", float, 30.0, "on SIGTERM, seconds running requests may take to finish before they "
            "end with finish_reason 'shutdown'", "S"),
    # what the router books for each stage beside its weights and KV
    Setting("stage_overhead", str, "auto", "memory booked for each stage beside its weights and KV: its process's "
            "fixed cost on the device (CUDA context and kernels, cuBLAS and activation workspace). auto: 512MiB "
            "on GPUs (an estimate, not a measurement: read a stage process's memory in nvidia-smi and set it), 0 "
            "on CPU devices; or a size, e.g. 1GiB", "BYTES"),
    _LOG_FORMAT,
]
# The runtime settings `flexpipe router` offers: all of flexpipe.api.Settings but the device (each
# worker says which devices it has).  Its max_message_bytes is its own actors' and, passed on with each
# StartStage, that of every stage process its workers start.
ROUTER_RUNTIME_SETTINGS = [s for s in RUNTIME_SETTINGS if s.name != "device"]

# `flexpipe worker`'s: the router's URL is FLEXPIPE_ROUTER (serve's, the same URL) and the usage reports'
# interval FLEXPIPE_USAGE_INTERVAL, as before; the rest FLEXPIPE_WORKER_* (FLEXPIPE_HOST is serve's listen
# address, FLEXPIPE_HEARTBEAT_* the stages' heartbeats).
_worker = _prefixed("WORKER")
WORKER_SETTINGS = [
    Setting("router", str, None, "the router's tcp://HOST:PORT or ipc:///PATH (needed)", "URL"),
    _worker("name", str, None, "worker (and node) name, unique in the cluster (default: HOSTNAME-PID)", "NAME"),
    _worker("host", str, None, "address the router and other stages reach this worker's stages at (default: "
            "this machine's address on the route to the router)", "HOST"),
    _worker("devices", str, "auto", "auto (GPUs via pynvml, else one CPU device), cpu, cpu:0,cpu:1, cuda, or "
            "cuda:0,cuda:1", "DEVICES"),
    _worker("memory", str, None, "memory budget of each CPU device, e.g. 2GB (default: 2GiB); for GPUs, a cap "
            "on what each offers", "BYTES"),
    _worker("heartbeat_interval", float, 0.5, "seconds between heartbeats with the router", "S"),
    _worker("heartbeat_timeout", float, 3.0, "seconds without a heartbeat before the router counts as gone", "S"),
    # how often a worker tells the router what other tenants use on its devices
    Setting("usage_interval", float, 2.0, "seconds between reports to the router of the memory other tenants use "
            "on this worker's GPUs, which placement avoids (0: never; the router then knows only what they used "
            "when this worker joined)", "S"),
    # the worker's own mailbox (its stages take the router's): the variable and top-level key of the
    # router's (and serve's), so that one of them gives the whole cluster one limit
    dataclasses.replace(next(s for s in RUNTIME_SETTINGS if s.name == "max_message_bytes"),
                        help="largest message this worker's own actor sends or takes (the stages it starts take "
                             "the router's --max-message-bytes): give every daemon of a cluster the same"),
    _LOG_FORMAT,
]

# Every command that reads a config file, with all its settings: the tables a file may have, and the
# keys each of them takes.
COMMAND_SETTINGS: dict[str, list[Setting]] = {
    "serve": SERVE_SETTINGS + RUNTIME_SETTINGS,
    "chat": CHAT_SETTINGS,
    "generate": GENERATE_SETTINGS,
    "router": ROUTER_SETTINGS + ROUTER_RUNTIME_SETTINGS,
    "worker": WORKER_SETTINGS,
}


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
        converted = setting.type(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: bad value {value!r} for {setting.name}: {e}") from None
    if setting.choices is not None and converted not in setting.choices:
        raise ConfigError(f"{where}: bad value {value!r} for {setting.name}: give one of "
                          f"{', '.join(setting.choices)}")
    return converted


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping a YAML (any suffix but .toml) or TOML file of settings holds."""
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
    return data


def _keys(mapping: dict[Any, Any]) -> dict[str, Any]:
    return {str(k).replace("-", "_"): v for k, v in mapping.items()}


def _owners(commands: list[str]) -> str:
    return " and ".join(f"`flexpipe {c}`'s" for c in commands)


def _top_level_owners(section: str, name: str) -> list[str] | None:
    """The commands whose setting `name` is at a config file's top level when it is not `section`'s; None
    when it is (or `section` has no such setting).

    A key means there what its variable FLEXPIPE_<NAME> means.  A command whose setting of that name reads
    a variable of its own (FLEXPIPE_CHAT_MODEL, FLEXPIPE_WORKER_HOST) while another command's reads another
    does so because the name means something else to it: it takes that setting from its own table only."""
    envs = {c: s.env for c, settings in COMMAND_SETTINGS.items() for s in settings if s.name == name}
    plain = "FLEXPIPE_" + name.upper()
    if envs.get(section, plain) == plain or len(set(envs.values())) == 1:
        return None
    return [c for c, env in envs.items() if env == plain]


def load_config_file(path: str | os.PathLike[str], section: str, own: Iterable[str] | None = None
                     ) -> dict[str, Any]:
    """The values the YAML or TOML file at `path` gives `section`'s settings (the keys `own`; default: all
    of the command's, COMMAND_SETTINGS): those of its [section] table, else of its top level.

    A table is a command's (COMMAND_SETTINGS) and holds only that command's keys.  At the top level, which
    every command without a table of its own reads, a key of another command's is left to that command,
    and a key means what FLEXPIPE_<KEY> means (_top_level_owners): a command to which it means something
    else leaves it to the commands it is meant for, rather than read as its own a value meant for another
    (serve's listen address as the worker's stage address; it takes its own from its table).  Anything
    else (a typo) is refused: it would be silently not used."""
    own = {s.name for s in COMMAND_SETTINGS.get(section, [])} if own is None else set(own)
    data = read_config_file(path)
    tables = sorted(str(k) for k, v in data.items() if isinstance(v, dict) and str(k) not in COMMAND_SETTINGS)
    if tables:
        raise ConfigError(f"config file {path}: unknown table(s) {', '.join(f'[{t}]' for t in tables)}; a table "
                          f"is named after the command that reads it: {', '.join(COMMAND_SETTINGS)}")
    whose: dict[str, list[str]] = {}   # key -> the other commands that take it
    for command, settings in COMMAND_SETTINGS.items():
        for name in dict.fromkeys(s.name for s in settings):
            if command != section:
                whose.setdefault(name, []).append(command)
    in_table = isinstance(data.get(section), dict)
    values = _keys(data[section]) if in_table else {k: v for k, v in _keys(data).items() if not isinstance(v, dict)}
    unknown = sorted(k for k in values if k not in own and (in_table or not whose.get(k)))
    if unknown:
        theirs = [f"{k} is {_owners(whose[k])}" for k in unknown if whose.get(k)]
        hint = f" ({'; '.join(theirs)}: put each at the top level or in its command's table)" if theirs else ""
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)} for `flexpipe {section}`"
                          f"{hint}; known: {', '.join(sorted(own))}")
    if not in_table:   # a key that means another command's setting there is that command's, not ours
        values = {k: v for k, v in values.items() if _top_level_owners(section, k) is None}
    return {k: v for k, v in values.items() if k in own}


def resolve_settings(settings: list[Setting], args: argparse.Namespace, section: str,
                     environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Each setting's value: flag, else its environment variable, else config file, else default.

    `section`: the command (`flexpipe SECTION`), whose table of the file it reads, and whose settings
    (COMMAND_SETTINGS, and `settings`) the file may set there."""
    environ = os.environ if environ is None else environ
    config_path = getattr(args, "config", None) or environ.get("FLEXPIPE_CONFIG")
    own = {s.name for s in settings} | {s.name for s in COMMAND_SETTINGS.get(section, [])}
    from_file = load_config_file(config_path, section, own) if config_path else {}
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
        table_only = _top_level_owners(section, s.name) is not None
        where = f"env {s.env}; config key '{s.name}'" + (f" in [{section}] only" if table_only else "")
        default = "" if s.default is None else f"; default {s.default!r}"
        help_ = f"{s.help} ({where}{default})".replace("%", "%%")
        if s.positional:
            p.add_argument(s.name, nargs="?", default=None, metavar=s.metavar, help=help_)
        elif s.type is bool:
            p.add_argument(s.flag, dest=s.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(s.flag, dest=s.name, type=s.type, default=None, metavar=s.metavar, choices=s.choices,
                           help=help_)
    if not config_flag:
        return
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"YAML or TOML file of settings: its [{section}] table, else its top level, where keys of "
                        f"the other commands ({', '.join(c for c in COMMAND_SETTINGS if c != section)}) are left "
                        "to them (env FLEXPIPE_CONFIG)")

