"""`flexpipe generate` takes its runtime settings as `flexpipe serve` does: the flag, else FLEXPIPE_<NAME>,
else the config file (--config or FLEXPIPE_CONFIG; its [generate] table, else its top level), else the
default.  It read only its flags: a shell or a file set up for `flexpipe serve` did not steer it, and a
bad value there went unnoticed.  The pipelines here run in this process for one token (tiny model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexpipe.cli import main

pytestmark = pytest.mark.timeout(60)

FAST = ["generate", "--in-process", "--max-tokens", "1"]   # a run the CLI wrongly lets through ends soon


@pytest.fixture(autouse=True)
def no_flexpipe_env(monkeypatch):
    """Only the variables a test sets: none of the shell's FLEXPIPE_* settings."""
    for name in [n for n in os.environ if n.startswith("FLEXPIPE_") and n != "FLEXPIPE_SHM_PREFIX"]:
        monkeypatch.delenv(name)


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 1
    out = capsys.readouterr()
    assert out.err.startswith("flexpipe: error: ") and out.err.count("\n") == 1, out.err
    assert out.out == "", out.out   # refused before the pipeline started (no header, no prompt)
    return out.err


def test_a_bad_environment_value_is_the_same_one_line_error_as_serve_gives(monkeypatch, capsys):
    pytest.importorskip("starlette", reason="the 'serve' extra is not installed")
    monkeypatch.setenv("FLEXPIPE_NUM_BLOCKS", "many")
    err = _error(FAST, capsys)
    assert "environment variable FLEXPIPE_NUM_BLOCKS: bad value 'many' for num_blocks" in err, err
    assert main(["serve", "--port", "0"]) == 1
    assert capsys.readouterr().err == err


def test_a_runtime_setting_from_the_environment_reaches_the_pipeline(monkeypatch, capsys):
    monkeypatch.setenv("FLEXPIPE_BLOCK_SIZE", "0")   # refused by the runtime's own check: it got there
    assert "setting block_size=0" in _error(FAST, capsys)


@pytest.mark.parametrize("text, name", [('[generate]\nrt_priority = 100\n', "generate.toml"),
                                        ("rt_priority: 100\nport: 0\n", "top-level.yaml")])
def test_a_runtime_setting_from_the_config_file_reaches_the_pipeline(text, name, tmp_path, monkeypatch, capsys):
    f = tmp_path / name
    f.write_text(text)   # (the top-level file is one serve reads too: its `port` is no typo)
    assert "setting rt_priority=100" in _error([*FAST, "--config", str(f)], capsys)
    monkeypatch.setenv("FLEXPIPE_CONFIG", str(f))
    assert "setting rt_priority=100" in _error(FAST, capsys)


def test_an_unknown_key_or_a_missing_config_file_is_one_error_line(tmp_path, monkeypatch, capsys):
    f = tmp_path / "typo.toml"
    f.write_text("[generate]\nnum_block = 64\n")
    assert f"config file {f}: unknown setting(s) num_block for `flexpipe generate`" in _error(
        [*FAST, "--config", str(f)], capsys)
    monkeypatch.setenv("FLEXPIPE_CONFIG", str(tmp_path / "none.toml"))
    assert "cannot read config file" in _error(FAST, capsys)


def test_a_flag_beats_the_environment_which_beats_the_file(tmp_path, monkeypatch, capsys):
    f = tmp_path / "f.toml"
    f.write_text("block_size = 0\nnum_blocks = 0\n")
    monkeypatch.setenv("FLEXPIPE_CONFIG", str(f))
    monkeypatch.setenv("FLEXPIPE_BLOCK_SIZE", "4")   # over the file's 0
    monkeypatch.setenv("FLEXPIPE_NUM_BLOCKS", "0")
    assert "setting num_blocks=0" in _error(FAST, capsys)
    assert main([*FAST, "--num-blocks", "32", "Hi"]) == 0, capsys.readouterr().err   # the flag over both
    assert capsys.readouterr().out.startswith("# model tiny: 2 stages")


def test_the_sampling_seed_is_not_read_as_the_weights_seed(monkeypatch, capsys):
    """generate's --seed is the sampling seed; FLEXPIPE_SEED (serve's weights seed) does not set it, and is
    not a runtime setting here either."""
    monkeypatch.setenv("FLEXPIPE_SEED", "not a number")
    assert main([*FAST, "Hi"]) == 0, capsys.readouterr().err


def test_help_names_the_environment_variables_and_the_config_file(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    assert "FLEXPIPE_NUM_BLOCKS" in text and "FLEXPIPE_RT_PRIORITY" in text and "--config" in text
    assert "FLEXPIPE_CONFIG" in text and "FLEXPIPE_SEED" not in text


# --- one config file for every command ---------------------------------------------------------------------
def test_the_daemons_keys_at_the_top_level_are_left_to_them(tmp_path, capsys):
    """A file the router and the worker read too: their keys were unknown settings to generate."""
    f = tmp_path / "shared.yaml"
    f.write_text("rt_priority: 100\nbind: ipc:///tmp/r\nmin_workers: 2\ndevices: cpu:0\nstage_overhead: 1GiB\n")
    assert "setting rt_priority=100" in _error([*FAST, "--config", str(f)], capsys)


@pytest.mark.parametrize("text, words", [
    # in generate's own table a key of serve's is a mistake (it was taken, and silently not used)
    ("[generate]\nport = 0\n", "unknown setting(s) port for `flexpipe generate` (port is `flexpipe serve`'s"),
    # a table no command reads: its settings were silently not used
    ("[genrate]\nrt_priority = 100\n", "unknown table(s) [genrate]"),
])
def test_a_table_is_named_after_a_command_and_holds_only_its_keys(text, words, tmp_path, capsys):
    f = tmp_path / "f.toml"
    f.write_text(text)
    err = _error([*FAST, "--config", str(f)], capsys)
    assert err.startswith(f"flexpipe: error: config file {f}: {words}"), err


NO_SERVE_EXTRA = """
import importlib, json, sys
sys.modules.update(dict.fromkeys(["starlette", "uvicorn", "prometheus_client", "jinja2", "httpx"]))
try:
    importlib.import_module("flexpipe.server.cli")
except ModuleNotFoundError:
    print("no serve extra")
from flexpipe.cli import main
print([main(argv) for argv in json.loads(sys.argv[1])])
"""


def test_without_the_serve_extra_generate_still_knows_serves_keys(tmp_path):
    """Without the 'serve' extra (server/cli.py cannot be imported) generate refused a file it shares with
    serve at the top level: `port` was an unknown setting.  A key no command takes is still refused."""
    shared, typo = tmp_path / "shared.yaml", tmp_path / "typo.yaml"
    shared.write_text("rt_priority: 100\nport: 0\nrouter_timeout: 5\nurl: http://127.0.0.1:1\n")
    typo.write_text("rt_priority: 100\nprot: 0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXPIPE_") or k == "FLEXPIPE_SHM_PREFIX"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", NO_SERVE_EXTRA, json.dumps([[*FAST, "--config", str(f)]
                                                                            for f in (shared, typo)])],
                         cwd=root, env=dict(env, PYTHONPATH=str(root)), capture_output=True, text=True, timeout=50)
    assert out.stdout.splitlines() == ["no serve extra", "[1, 1]"], out.stdout + out.stderr
    first, second = out.stderr.splitlines()
    assert first.startswith("flexpipe: error: ") and "setting rt_priority=100" in first, out.stderr
    assert second.startswith(f"flexpipe: error: config file {typo}: unknown setting(s) prot for `flexpipe generate`")
