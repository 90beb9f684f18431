"""`flexpipe generate`: the README's main command, with the runtime settings as flags."""

from __future__ import annotations

import pytest

from flexpipe.cli import main

pytestmark = pytest.mark.timeout(120)


def test_generate_with_runtime_settings_equals_the_reference(capsys):
    code = main(["generate", "--stages", "2", "--max-tokens", "10", "--temperature", "0.7", "--seed", "3",
                 "--block-size", "4", "--max-inflight", "1", "--num-blocks", "64", "--check", "settings as flags"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("# model tiny: 2 stages") and "10 tokens, identical to the single-process reference" in out


@pytest.mark.parametrize("flags, says", [(["--block-size", "0"], "setting block_size=0"),
                                         (["--rt-priority", "100"], "setting rt_priority=100"),
                                         (["--dtype", "float8"], "setting dtype='float8'")])
def test_bad_runtime_settings_are_one_line_errors_before_anything_starts(capsys, flags, says):
    assert main(["generate", *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flexpipe: error: ") and says in err, err


def test_an_unknown_log_level_is_a_usage_error(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["--log-level", "bogus", "generate"])
    assert e.value.code == 2 and "give one of CRITICAL, ERROR, WARNING, INFO, DEBUG" in capsys.readouterr().err
    monkeypatch.setenv("FLEXPIPE_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit):
        main(["generate"])
    assert "'loud' (or FLEXPIPE_LOG_LEVEL)" in capsys.readouterr().err
