"""`flexpipe router` and `flexpipe worker` take each setting as `flexpipe serve` and `generate` do: the flag,
else its environment variable, else the config file (--config or FLEXPIPE_CONFIG; its [router] / [worker]
table, else its top level, where the other commands' keys are theirs), else the default.  The router took
its runtime settings (--num-blocks ... --rt-priority) from flags only, and neither daemon read a config
file: a shell or a file set up for `flexpipe serve` did not steer it, and a bad value there went unnoticed.

The refusals run `flexpipe` in this process with serving stubbed out (tests/test_daemon_usage.py's
refused_before_serving: nothing is served either way); the daemons that take their settings from a
shared file run as real processes, waited on through their log events (tests/test_daemons.py's Daemon).
"""

from __future__ import annotations

import os

import pytest

from flexpipe.cli import main
from tests.test_daemon_usage import refused_before_serving

pytestmark = pytest.mark.timeout(60)

NEVER = "ipc:///tmp/flexpipe-never-bound"
ROUTER = ["router", "--bind", NEVER]
WORKER = ["worker", "--router", NEVER, "--devices", "cpu:0"]


@pytest.fixture(autouse=True)
def no_flexpipe_env(monkeypatch):
    """Only the variables a test sets: none of the shell's FLEXPIPE_* settings."""
    for name in [n for n in os.environ if n.startswith("FLEXPIPE_") and n != "FLEXPIPE_SHM_PREFIX"]:
        monkeypatch.delenv(name)


def _error(argv: list[str], monkeypatch, capsys) -> str:
    """The one 'flexpipe: error:' line `flexpipe ARGV` exits 1 with, before it serves."""
    err = refused_before_serving(argv, monkeypatch, capsys)
    assert err.startswith("flexpipe: error: ") and err.count("\n") == 1, err
    return err


# --- the environment ------------------------------------------------------------------------------------
def test_a_bad_environment_value_is_the_same_one_line_error_as_generate_gives(monkeypatch, capsys):
    monkeypatch.setenv("FLEXPIPE_NUM_BLOCKS", "many")
    err = _error(ROUTER, monkeypatch, capsys)
    assert "environment variable FLEXPIPE_NUM_BLOCKS: bad value 'many' for num_blocks" in err, err
    assert main(["generate", "--in-process", "--max-tokens", "1"]) == 1
    assert capsys.readouterr().err == err
    # the worker's own settings, as the router's: it was argparse's usage error (exit 2)
    monkeypatch.setenv("FLEXPIPE_USAGE_INTERVAL", "often")
    assert "environment variable FLEXPIPE_USAGE_INTERVAL: bad value 'often' for usage_interval" in _error(
        WORKER, monkeypatch, capsys)


def test_a_runtime_setting_from_the_environment_reaches_the_router(monkeypatch, capsys):
    monkeypatch.setenv("FLEXPIPE_RT_PRIORITY", "100")   # refused by the runtime's own check: it got there
    assert "setting rt_priority=100" in _error(ROUTER, monkeypatch, capsys)


# --- the config file ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, name", [("[router]\nrt_priority = 100\n", "router.toml"),
                                        ("rt_priority: 100\nport: 0\nurl: http://h:1\nmax_tokens: 8\n",
                                         "top-level.yaml")])
def test_a_runtime_setting_from_the_config_file_reaches_the_router(text, name, tmp_path, monkeypatch, capsys):
    f = tmp_path / name
    f.write_text(text)   # (the top-level file is one serve and chat read too: their keys are no typo)
    assert "setting rt_priority=100" in _error([*ROUTER, "--config", str(f)], monkeypatch, capsys)
    monkeypatch.setenv("FLEXPIPE_CONFIG", str(f))
    assert "setting rt_priority=100" in _error(ROUTER, monkeypatch, capsys)


def test_the_environment_beats_the_file(tmp_path, monkeypatch, capsys):
    f = tmp_path / "f.toml"
    f.write_text("[router]\nblock_size = 0\nnum_blocks = 0\n")
    monkeypatch.setenv("FLEXPIPE_CONFIG", str(f))
    assert "setting block_size=0" in _error(ROUTER, monkeypatch, capsys)
    monkeypatch.setenv("FLEXPIPE_BLOCK_SIZE", "4")   # over the file's 0
    assert "setting num_blocks=0" in _error(ROUTER, monkeypatch, capsys)


@pytest.mark.parametrize("command, text, words", [
    (ROUTER, "[router]\nnum_block = 64\n", "unknown setting(s) num_block for `flexpipe router`"),
    (ROUTER, "num_block = 64\nport = 0\n", "unknown setting(s) num_block for `flexpipe router`"),
    # a key of another command's in this command's own table is a mistake, not one to leave to it
    (ROUTER, "[router]\nport = 0\n", "port is `flexpipe serve`'s"),
    (WORKER, "[worker]\nbind = 'tcp://h:1'\n", "bind is `flexpipe router`'s"),
    (ROUTER, "[routr]\nmin_workers = 2\n", "unknown table(s) [routr]"),
    (WORKER, "[worker]\nmemory = '0'\n", "--memory '0': give a positive size"),
    (WORKER, "log_format = 'xml'\n", "bad value 'xml' for log_format: give one of kv, json"),
])
def test_the_daemons_refuse_a_config_file_they_cannot_take_in_one_line(command, text, words, tmp_path,
                                                                       monkeypatch, capsys):
    f = tmp_path / "flexpipe.toml"
    f.write_text(text)
    err = _error([*command, "--config", str(f)], monkeypatch, capsys)
    assert f"config file {f}" in err or "--memory" in words, err
    assert words in err, err


def test_a_worker_with_no_router_anywhere_says_where_to_give_it(tmp_path, monkeypatch, capsys):
    f = tmp_path / "flexpipe.toml"
    f.write_text("[worker]\ndevices = 'cpu:0'\n")
    err = _error(["worker", "--config", str(f)], monkeypatch, capsys)
    assert "--router" in err and "FLEXPIPE_ROUTER" in err and "'router'" in err, err


def test_help_says_where_each_value_comes_from(capsys):
    for command, names in (("router", ["FLEXPIPE_NUM_BLOCKS", "FLEXPIPE_RT_PRIORITY", "FLEXPIPE_ROUTER_BIND",
                                       "FLEXPIPE_STAGE_OVERHEAD", "config key 'min_workers'"]),
                           ("worker", ["FLEXPIPE_ROUTER", "FLEXPIPE_USAGE_INTERVAL", "FLEXPIPE_WORKER_DEVICES",
                                       "config key 'memory'"])):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
        for name in [*names, "--config", "FLEXPIPE_CONFIG", f"[{command}]", "environment variable"]:
            assert name in text, (command, name)
        assert "FLEXPIPE_DEVICE " not in text and "--device " not in text   # each worker says which it has


# --- one file for every command, as real daemons -----------------------------------------------------------
def test_a_router_and_a_worker_take_their_settings_from_one_shared_file(tmp_path, monkeypatch):
    """Top level: the router's settings beside serve's (`port`) and chat's (`url`), which it leaves to them;
    [worker]: the worker's.  The environment beats the file (FLEXPIPE_ROUTER_BIND, FLEXPIPE_BLOCK_SIZE),
    a flag beats both (--num-blocks, --min-workers): the router refuses a block_size or num_blocks of 0."""
    from tests.test_daemons import Daemon

    bind = f"ipc://{tmp_path}/router"
    f = tmp_path / "flexpipe.toml"
    f.write_text(f"bind = 'ipc://{tmp_path}/not-this'\nstages = 1\nmin_workers = 2\nblock_size = 0\n"
                 f"num_blocks = 0\nport = 0\nurl = 'http://127.0.0.1:1'\n"
                 f"[worker]\nrouter = '{bind}'\nname = 'cw'\ndevices = 'cpu:0,cpu:1'\nmemory = '256MiB'\n")
    monkeypatch.setenv("FLEXPIPE_CONFIG", str(f))
    monkeypatch.setenv("FLEXPIPE_ROUTER_BIND", bind)
    monkeypatch.setenv("FLEXPIPE_BLOCK_SIZE", "4")
    router = Daemon("env-router", ["router", "--num-blocks", "32", "--min-workers", "3"])
    worker = None
    try:
        listening = router.wait_for("listening", timeout=30)
        assert (listening["endpoint"], listening["stages"], listening["min_workers"]) == (bind, 1, 3), listening
        worker = Daemon("env-worker", ["worker"])
        joined = router.wait_for("worker_joined", timeout=30, worker="cw")
        assert joined["devices"] == ["cw/0", "cw/1"], joined
    finally:
        codes = [d.stop() for d in (worker, router) if d is not None]
    assert codes == [0] * len(codes)
