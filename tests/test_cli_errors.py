"""Bad values and paths on the command line end in one "flexpipe: error: ..." line and exit 1, before
any work starts: no traceback, and nothing silently read some other way."""

from __future__ import annotations

import pytest

from flexpipe.cli import main

pytestmark = pytest.mark.timeout(60)

pytest.importorskip("numpy", reason="the 'sim' extra is not installed")

# (cheap settings, so that a run the CLI wrongly lets through ends soon)
SIM = ["simulate", "--preset", "small", "--duration", "1", "--quiet", "--no-plots"]


@pytest.mark.parametrize("argv, words", [
    ([*SIM, "--cv", "abc"], "--cv 'abc': 'abc' is not a number"),
    ([*SIM, "--cv", "-1"], "a CV is a number >= 0"),
    ([*SIM, "--cv", "nan"], "a CV is a number >= 0"),
    ([*SIM, "--policies", ","], "--policies ',' names no policy"),
    ([*SIM, "--lengths", "/missing.csv"], "/missing.csv: No such file or directory"),
    (["simulate", "calibrate", "--measurements", "/missing.json"], "/missing.json: No such file or directory"),
    (["simulate", "calibrate", "--measurements", "{not_json}"], "not a JSON file"),
    (["topology", "--from", "paper-testbed-82", "--fragment", "-1"], "--fragment -1: the seed is an integer >= 0"),
    (["topology", "--from", "paper-testbed-82", "--write", "/nonexistent/dir/x.json"],
     "/nonexistent/dir/x.json: No such file or directory"),
    (["keys", "--dir", "/proc/nope"], "/proc/nope: No such file or directory"),
])
def test_a_bad_value_or_path_is_one_error_line(argv, words, tmp_path, capsys):
    not_json = tmp_path / "measurements.json"
    not_json.write_text("stage,seconds\n0,0.1\n")
    argv = [str(not_json) if a == "{not_json}" else a for a in argv]
    assert main(argv) == 1
    out = capsys.readouterr()
    assert out.err.startswith("flexpipe: error: ") and words in out.err, out.err
    assert "Traceback" not in out.err + out.out


@pytest.mark.parametrize("flag, value, words", [("--max-tokens", "0", "max_tokens must be"),
                                                ("--top-p", "0", "top_p must be"),
                                                ("--temperature", "-1", "temperature must be")])
def test_generate_refuses_sampling_parameters_before_starting_a_stage(flag, value, words, capsys):
    # they were checked by the first generate(), after the stages had started (and, from a checkpoint,
    # loaded their weights) and the header and prompt were printed: "Helloflexpipe: error: ..."
    assert main(["generate", "--stages", "2", flag, value, "Hello"]) == 1
    out = capsys.readouterr()
    assert out.err.startswith("flexpipe: error: ") and words in out.err, out.err
    assert out.out == "", out.out
