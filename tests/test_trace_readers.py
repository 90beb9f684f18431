"""The BurstGPT and Azure Functions readers refuse a bad file as the Azure LLM reader does: a ConfigError
naming the file, the line and what is wrong, not a bare KeyError, ValueError, TypeError, StopIteration or
UnicodeDecodeError, and not a trace read some other way (negative lengths, nan arrivals, shifted minutes)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from flexpipe.errors import ConfigError
from flexpipe.sim import traces as T

pytestmark = pytest.mark.timeout(60)

BURST = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
COUNTS = "HashOwner,HashApp,HashFunction,Trigger,1,2,3\n"
INVOCATIONS = "app,func,end_timestamp,duration\n"


@pytest.mark.parametrize("reader, text, words", [
    # BurstGPT
    (T.read_burstgpt, "Timestamp,Model,Request tokens\n5,a,3\n", "{f}: not a BurstGPT trace (columns"),
    (T.read_burstgpt, BURST + "5,ChatGPT,100\n", "{f}, line 2: no Response tokens (the row has fewer columns"),
    (T.read_burstgpt, BURST + "5,ChatGPT,abc,20,120,x\n",
     "{f}, line 2: Request tokens 'abc' is not a whole number >= 0 (a token count)"),
    (T.read_burstgpt, BURST + "5,ChatGPT,100,20,120,x\n6,ChatGPT,-100,20,120,x\n",
     "{f}, line 3: Request tokens '-100' is not a whole number >= 0"),
    (T.read_burstgpt, BURST + "5,ChatGPT,1.5,20,120,x\n", "{f}, line 2: Request tokens '1.5' is not a whole"),
    (T.read_burstgpt, BURST + "soon,ChatGPT,100,20,120,x\n", "{f}, line 2: Timestamp 'soon' is not a time"),
    (T.read_burstgpt, BURST + "nan,ChatGPT,100,20,120,x\n", "{f}, line 2: Timestamp 'nan' is not a time"),
    (T.read_burstgpt, "", "{f}: not a BurstGPT trace (columns None"),
    # Azure Functions 2019: per-minute counts
    (T.read_azure_functions_counts, "HashOwner,HashApp\na,b\n", "{f}: not an Azure Functions invocation-count"),
    (T.read_azure_functions_counts, COUNTS + "a,b,c,http,1,0\n", "{f}, line 2: 6 columns but the header has 7"),
    (T.read_azure_functions_counts, COUNTS + "a,b,c,http,1,x,2\n",
     "{f}, line 2: minute 2 'x' is not a whole number >= 0 (an invocation count)"),
    (T.read_azure_functions_counts, COUNTS + "a,b,c,http,1,0,2\nd,e,f,timer,1,-4,2\n",
     "{f}, line 3: minute 2 '-4' is not a whole number >= 0"),
    (T.read_azure_functions_counts, "", "{f}: not an Azure Functions invocation-count file (columns None"),
    # Azure Functions 2021: invocations
    (T.read_azure_functions_invocations, "app,func,end_timestamp\na,f,1\n", "{f}: not an Azure Functions 2021"),
    (T.read_azure_functions_invocations, INVOCATIONS + "a,f,10.5\n", "{f}, line 2: no duration (the row has"),
    (T.read_azure_functions_invocations, INVOCATIONS + "a,f,x,0.5\n", "{f}, line 2: end_timestamp 'x' is not a time"),
    (T.read_azure_functions_invocations, INVOCATIONS + "a,f,nan,0.5\n", "{f}, line 2: end_timestamp 'nan' is not"),
    (T.read_azure_functions_invocations, INVOCATIONS + "a,f,10,-0.5\n",
     "{f}, line 2: duration '-0.5' is not a duration (a finite number of seconds >= 0)"),
    (T.read_azure_functions_invocations, INVOCATIONS + "a,f,10,inf\n", "{f}, line 2: duration 'inf' is not a"),
    (T.read_azure_functions_invocations, "", "{f}: not an Azure Functions 2021 trace (columns None"),
])
def test_a_bad_file_names_the_file_the_line_and_what_is_wrong(reader, text, words, tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(words.format(f=f))):
        reader(f)


@pytest.mark.parametrize("reader, header", [(T.read_burstgpt, BURST), (T.read_azure_functions_counts, COUNTS),
                                            (T.read_azure_functions_invocations, INVOCATIONS),
                                            (T.read_azure_llm, "TIMESTAMP,ContextTokens,GeneratedTokens\n")])
def test_a_file_that_is_not_utf8_names_the_file(reader, header, tmp_path):
    f = tmp_path / "latin1.csv"
    f.write_bytes(header.encode() + "5,Modèle,1,2,3\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=re.escape(f"{f}: not UTF-8 text (byte b'\\xe8'")):
        reader(f)


def test_good_files_still_read_as_before(tmp_path):
    b = tmp_path / "burst.csv"
    b.write_text(BURST + "5,ChatGPT,100,20,120,Conversation log\n3,GPT-4,50.0,10,60,Conversation log\n"
                 "9,ChatGPT,70,0,70,API log\n")
    t = T.read_burstgpt(b)
    assert t.arrivals.tolist() == [0.0, 2.0, 6.0] and t.prompt.tolist() == [50, 100, 70]
    assert t.output.tolist() == [10, 20, 0] and t.model.tolist() == [1, 0, 0]
    assert len(T.read_burstgpt(b, model_name="GPT-4")) == 1
    (tmp_path / "header_only.csv").write_text(BURST)
    assert len(T.read_burstgpt(tmp_path / "header_only.csv")) == 0
    c = tmp_path / "counts.csv"
    c.write_text(COUNTS + "a,b,c,http,1,,2\n\nd,e,f,timer,0,4,1\n")   # an empty cell is 0; a blank line is skipped
    assert T.read_azure_functions_counts(c).tolist() == [1, 4, 3]
    assert T.read_azure_functions_counts(c, top=1).tolist() == [0, 4, 1]
    (tmp_path / "header_only.csv").write_text(COUNTS)
    assert T.read_azure_functions_counts(tmp_path / "header_only.csv").tolist() == []
    i = tmp_path / "inv.csv"
    i.write_text(INVOCATIONS + "a,f,10.5,0.5\na,f,3.0,1.0\na,f,4,0\n")
    assert T.read_azure_functions_invocations(i).tolist() == [0.0, 2.0, 8.0]
    for f, read in ((b, T.read_burstgpt), (c, T.read_azure_functions_counts), (i, T.read_azure_functions_invocations)):
        bom = tmp_path / f"bom_{f.name}"   # "UTF-8 CSV" as spreadsheets save it
        bom.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
        assert np.array_equal(np.asarray(read(bom).arrivals if read is T.read_burstgpt else read(bom)),
                              np.asarray(read(f).arrivals if read is T.read_burstgpt else read(f)))
