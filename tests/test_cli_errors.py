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


PART = ["partition", "--preset", "tiny", "--stages", "2"]


@pytest.mark.parametrize("argv, words", [
    # the preset's warm-up (300 s) is simulated, not measured: a run inside it reported goodput 0.00
    (["simulate", "--preset", "paper-82gpu", "--cv", "1", "--policies", "static-peak", "--quiet",
      "--duration", "200"], "ends within paper-82gpu's warm-up of 300 s"),
    (["simulate", "--preset", "paper-82gpu", "--cv", "1", "--policies", "static-peak", "--quiet",
      "--duration", "300"], "give a duration above 300 s (--duration)"),
    ([*SIM, "--duration", "nan"], "duration nan s: give a finite number of seconds > 0 (--duration)"),
    ([*SIM, "--duration", "inf"], "duration inf s: give a finite number of seconds > 0"),
    ([*SIM, "--duration", "-5"], "duration -5 s: give a finite number of seconds > 0"),
    ([*SIM, "--duration", "0"], "duration 0 s: give a finite number of seconds > 0"),
    ([*SIM, "--rate", "inf"], "rate inf: give a finite number of requests/s >= 0 (--rate"),
    ([*SIM, "--rate", "nan"], "rate nan: give a finite number of requests/s >= 0"),
    ([*SIM, "--rate", "-1"], "rate -1: give a finite number of requests/s >= 0"),
    ([*PART, "--tflops", "0"], "--tflops 0: give the effective TFLOP/s of a stage, a finite number > 0"),
    ([*PART, "--tflops", "nan"], "--tflops nan: give the effective TFLOP/s of a stage, a finite number > 0"),
    ([*PART, "--tflops", "inf"], "--tflops inf: give the effective TFLOP/s of a stage, a finite number > 0"),
    ([*PART, "--bandwidth", "0"], "--bandwidth '0': give the bytes/s between stages, > 0"),
    ([*PART, "--tokens", "-5"], "--tokens -5: give the tokens per micro-batch step, a whole number >= 1"),
    ([*PART, "--tokens", "0"], "--tokens 0: give the tokens per micro-batch step, a whole number >= 1"),
    ([*PART, "--kv-tokens", "-100000"], "--kv-tokens -100000: give the KV tokens reserved per stage, a whole "
                                        "number >= 0"),
    ([*PART, "--dtype-bytes", "0"], "--dtype-bytes 0: give the bytes per parameter, a whole number >= 1"),
])
def test_a_bad_number_is_one_error_line_before_any_work(argv, words, capsys):
    assert main(argv) == 1
    out = capsys.readouterr()
    assert out.err.startswith("flexpipe: error: ") and words in out.err, out.err
    assert "Traceback" not in out.err + out.out
    assert out.out == "", out.out   # no table, no partition printed


@pytest.mark.parametrize("text, words", [
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "{f}: no requests in it"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,12,x\n",
     "{f}, line 2: GeneratedTokens 'x' is not a whole number >= 0"),
])
def test_a_bad_lengths_file_is_one_error_line(text, words, tmp_path, capsys):
    f = tmp_path / "lengths.csv"
    f.write_text(text)
    assert main([*SIM, "--lengths", str(f)]) == 1
    out = capsys.readouterr()
    assert out.err.startswith("flexpipe: error: ") and words.format(f=f) in out.err, out.err
    assert "Traceback" not in out.err + out.out
