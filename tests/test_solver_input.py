"""solve() refuses arguments no partition can come from, with a PartitionError that says what to give, as
`flexpipe partition` does for its flags: it used to balance negative times and memory as if they were real,
read a bool as 1, or fail with a bare TypeError, IndexError, ValueError or OverflowError."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flexpipe.cli import main
from flexpipe.errors import PartitionError
from flexpipe.partition import CostModel, UnitGraph, UnitNode, parse_bytes, solve

pytestmark = pytest.mark.timeout(60)


def chain(n: int = 4) -> UnitGraph:
    return UnitGraph(tuple(UnitNode(i, f"u{i}", "mlp", None, 10, 1.0, 0, 1000) for i in range(n)))


@pytest.mark.parametrize("kwargs, words", [
    # the same words as `flexpipe partition --tokens/--kv-tokens` (tests/test_cli_errors.py)
    (dict(cost=CostModel(tokens=-5)), "cost model: tokens -5: give the tokens per micro-batch step, a whole "
                                      "number >= 1"),
    (dict(cost=CostModel(tokens=0)), "cost model: tokens 0: give the tokens per micro-batch step"),
    (dict(cost=CostModel(tokens=True)), "cost model: tokens True: give the tokens per micro-batch step"),
    (dict(cost=CostModel(tokens=2.5)), "cost model: tokens 2.5: give the tokens per micro-batch step"),
    (dict(cost=CostModel(kv_tokens=-1)), "cost model: kv_tokens -1: give the KV tokens reserved per stage, a "
                                         "whole number >= 0"),
    (dict(cost=CostModel(overhead_bytes=-100)), "cost model: overhead_bytes -100: give the bytes each stage "
                                                "holds besides its units, a whole number >= 0"),
    (dict(cost=CostModel(flops_per_s=True)), "cost model: flops_per_s is True; give a rate > 0"),
    (dict(cost=CostModel(flops_per_s="1e12")), "cost model: flops_per_s is '1e12'; give a rate > 0"),
    (dict(cost=CostModel(latency=True)), "cost model: latency is True; give a finite number of seconds >= 0"),
    (dict(cost=CostModel(bandwidth=True)), "cost model: bandwidth of link 0 is True; give a rate > 0"),
    (dict(cost=CostModel(bandwidth=[1e9, True])), "cost model: bandwidth of link 1 is True; give a rate > 0"),
    (dict(cost=CostModel(bandwidth="12.5GB")), "cost model: bandwidth is '12.5GB'; give a rate > 0"),
    (dict(cost=CostModel(bandwidth=[1e9])), "bandwidth lists 1 link rate(s) for 3 stages, which have 2 links"),
])
def test_a_cost_model_that_makes_no_sense_is_refused(kwargs, words):
    with pytest.raises(PartitionError) as e:
        solve(chain(), num_stages=3, **kwargs)
    assert words in str(e.value)


@pytest.mark.parametrize("num_stages", [0, -1, True, 2.0])
def test_a_stage_count_that_is_not_a_whole_number_above_zero_is_refused(num_stages):
    with pytest.raises(PartitionError, match=rf"num_stages {num_stages!r}: give the number of pipeline stages, "
                                             r"a whole number >= 1"):
        solve(chain(), num_stages=num_stages)


@pytest.mark.parametrize("cap", [-5, -0.5, math.nan, math.inf, True])
def test_a_cap_that_is_not_a_size_is_refused(cap):
    # (-5 was read as a cap no stage fits, True as 1 byte, nan and inf failed in int())
    with pytest.raises(PartitionError, match=rf"cannot read memory size {cap!r}: write e\.g\. 2GB"):
        solve(chain(), caps=[cap, 1000])
    with pytest.raises(PartitionError, match="cannot read memory size"):
        parse_bytes(cap)


def test_caps_given_as_one_string_are_refused():
    # (each character was one stage's cap: '100' was caps of 1, 0 and 0 bytes)
    with pytest.raises(PartitionError, match=r"caps '100': give a list of per-stage memory caps"):
        solve(chain(), caps="100")


def test_valid_arguments_of_other_numeric_types_still_solve():
    # numpy scalars and arrays are numbers and sequences as before
    plain = solve(chain(), num_stages=3, cost=CostModel(tokens=4, bandwidth=[1e9, 2e9]))
    numpy = solve(chain(), num_stages=np.int64(3), cost=CostModel(tokens=np.int64(4),
                                                                  bandwidth=np.array([1e9, 2e9])))
    assert numpy == plain
    assert solve(chain(), caps=[np.int64(20), 20.0]).boundaries == (0, 2, 4)
    assert (solve(chain(), num_stages=2, cost=CostModel(bandwidth=np.float32(1e9)))
            == solve(chain(), num_stages=2, cost=CostModel(bandwidth=float(np.float32(1e9)))))


@pytest.mark.parametrize("argv, words", [
    (["--stages", "0"], "--stages 0: give the number of pipeline stages, a whole number >= 1"),
    (["--stages", "-2"], "--stages -2: give the number of pipeline stages, a whole number >= 1"),
    (["--stages", "2", "--tokens", "-5"], "--tokens -5: give the tokens per micro-batch step, a whole number >= 1"),
])
def test_the_cli_names_its_flag_with_the_solvers_words(argv, words, capsys):
    assert main(["partition", "--preset", "tiny", *argv]) == 1
    out = capsys.readouterr()
    assert out.err.startswith("flexpipe: error: ") and words in out.err, out.err
    assert out.out == "", out.out
