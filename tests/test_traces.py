"""Trace readers (on the shipped slice and small written files) and synthetic generators."""

from __future__ import annotations

import numpy as np
import pytest

from flexpipe.errors import ConfigError
from flexpipe.sim import traces as T


def test_shipped_slice_reads_and_has_the_published_shape():
    tr = [T.read_azure_llm(p) for p in T.shipped_slice_paths()]
    assert [len(t) for t in tr] == [250, 150]
    lens = T.default_lengths()
    assert 800 < np.median(lens.prompt) < 1300  # README of the traces: conv median 1020, code 1469
    assert np.all(np.diff(tr[0].arrivals) >= 0) and tr[0].arrivals[0] == 0.0


def test_azure_llm_reader_rejects_other_files(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError):
        T.read_azure_llm(f)


def test_burstgpt_and_functions_readers(tmp_path):
    b = tmp_path / "burst.csv"
    b.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "5,ChatGPT,100,20,120,Conversation log\n3,GPT-4,50,10,60,Conversation log\n"
                 "9,ChatGPT,70,7,77,API log\n")
    t = T.read_burstgpt(b)
    assert list(t.arrivals) == [0.0, 2.0, 6.0] and list(t.prompt) == [50, 100, 70]
    assert len(T.read_burstgpt(b, model_name="ChatGPT")) == 2
    f = tmp_path / "inv.csv"
    f.write_text("HashOwner,HashApp,HashFunction,Trigger,1,2,3\na,b,c,http,1,0,2\nd,e,f,timer,0,4,1\n")
    counts = T.read_azure_functions_counts(f)
    assert list(counts) == [1, 4, 3]
    arr = T.arrivals_from_counts(counts, 60.0, np.random.default_rng(0))
    assert len(arr) == 8 and arr.max() < 180
    g = tmp_path / "inv21.csv"
    g.write_text("app,func,end_timestamp,duration\na,f,10.5,0.5\na,f,3.0,1.0\n")
    assert list(T.read_azure_functions_invocations(g)) == [0.0, 8.0]


@pytest.mark.parametrize("cv", [1.0, 4.0])
def test_gamma_generator_has_the_asked_rate_and_cv(cv):
    lens = T.default_lengths()
    tr = T.synthetic(3600.0, 10.0, cv, lens, seed=3)
    assert len(tr) / 3600.0 == pytest.approx(10.0, rel=0.15 * cv)
    assert tr.cv() == pytest.approx(cv, rel=0.2)
    assert tr.arrivals.max() < 3600.0


def test_time_varying_rate_follows_the_envelope():
    lens = T.default_lengths()
    env = [1.0, 3.0]
    tr = T.synthetic(2000.0, T.envelope_rate(5.0, env, 2000.0), 1.0, lens, seed=0)
    first = np.sum(tr.arrivals < 600)
    last = np.sum(tr.arrivals > 1400)
    assert last > 1.8 * first
    d = T.synthetic(86400.0, T.diurnal_rate(1.0, 0.6), 1.0, lens, seed=0)
    assert len(d) == pytest.approx(86400, rel=0.05)
    b = T.synthetic(600.0, T.burst_rate(T.constant_rate(1.0), [(100.0, 100.0, 10.0)]), 1.0, lens, seed=0)
    assert np.sum((b.arrivals >= 100) & (b.arrivals < 200)) > 5 * np.sum(b.arrivals < 100)


def test_scaled_and_clipped():
    tr = T.read_azure_llm(T.shipped_slice_paths()[0])
    s = tr.scaled_to_rate(2.0)
    assert len(s) / s.duration == pytest.approx(2.0, rel=1e-6)
    assert len(s.clipped(10.0)) <= 21
