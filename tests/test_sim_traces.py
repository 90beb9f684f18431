"""Trace files the simulator reads: timestamps in UTC whatever the machine's zone, and bad length files
refused with the file and line named."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from flexpipe.errors import ConfigError
from flexpipe.sim import traces as T

pytestmark = pytest.mark.timeout(60)

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


@pytest.fixture
def dst_zone():
    """The process's local zone set to one with daylight saving time, restored after."""
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset is Unix-only")
    before = os.environ.get("TZ")
    os.environ["TZ"] = "America/Los_Angeles"
    time.tzset()
    try:
        if time.localtime(1678615200).tm_isdst != 1:   # 2023-03-12 10:00 UTC, just after the change
            pytest.skip("no tz database for America/Los_Angeles on this machine")
        yield
    finally:
        if before is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = before
        time.tzset()


def test_azure_timestamps_are_utc_across_a_dst_change(dst_zone, tmp_path):
    # read in local time, 01:59 PST and 03:01 PDT were 2 minutes apart instead of 62
    f = tmp_path / "dst.csv"
    f.write_text(HEADER + "2023-03-12 01:59:00.0000000,10,10\n2023-03-12 03:01:00.0000000,10,10\n")
    assert T.read_azure_llm(f).arrivals.tolist() == [0.0, 3720.0]


def test_azure_timestamps_with_a_zone_keep_it(dst_zone, tmp_path):
    # (7 fractional digits and an offset: the offset's digits were read as more fraction, then dropped)
    f = tmp_path / "zoned.csv"
    f.write_text(HEADER + "2023-11-16 18:00:00Z,10,10\n2023-11-16 19:00:30+01:00,10,10\n"
                 "2023-11-16 18:00:10.1234567,10,10\n2023-11-16 19:00:40.5000000+01:00,10,10\n")
    assert T.read_azure_llm(f).arrivals.tolist() == pytest.approx([0.0, 10.123456, 30.0, 40.5])


def test_a_lengths_file_with_no_rows_names_the_file(tmp_path):
    f = tmp_path / "empty.csv"
    f.write_text(HEADER)
    with pytest.raises(ConfigError, match=rf"{f}: no requests.*at least one row"):
        T.default_lengths([f])


@pytest.mark.parametrize("row, words", [
    ("2023-11-16 18:17:03.9799600,12,x", r"line 2: GeneratedTokens 'x' is not a whole number >= 0"),
    ("2023-11-16 18:17:03.9799600,-3,4", r"line 2: ContextTokens '-3' is not a whole number >= 0"),
    ("yesterday,12,4", r"line 2: TIMESTAMP 'yesterday' is not a time"),
    ("nan,12,4", r"line 2: TIMESTAMP 'nan' is not a time"),
])
def test_a_bad_row_names_the_file_the_line_and_what_is_expected(row, words, tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text(HEADER + row + "\n")
    with pytest.raises(ConfigError, match=rf"{f}, {words}"):
        T.read_azure_llm(f)


def test_good_rows_still_read_as_before(tmp_path):
    f = tmp_path / "ok.csv"
    f.write_text(HEADER + "2023-11-16 18:17:03.9799600,0,0\n2023-11-16 18:17:04.0,7,3\n")
    lens = T.default_lengths([f])
    assert lens.prompt.tolist() == [0, 7] and lens.output.tolist() == [0, 3]
    p, o = lens.sample(5, np.random.default_rng(0))
    assert (p >= 1).all() and (o >= 1).all()
