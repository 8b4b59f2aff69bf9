import json

import pytest

from harness import results
from harness.errors import UserError


def test_append_load_roundtrip_skips_truncated_line(tmp_path):
    results.append(tmp_path, results.Record(suite="s", cell="c1", metric="perplexity", values={"perplexity": 3.0}))
    with open(tmp_path / results.RESULTS_FILE, "a") as f:
        f.write('{"schema": 1, "cell": "trunc')  # a kill mid-write
    recs = results.load(tmp_path)
    assert [r["cell"] for r in recs] == ["c1"]
    assert results.to_frame(recs)["perplexity"].tolist() == [3.0]


def test_bad_status_and_old_schema_are_errors(tmp_path):
    with pytest.raises(ValueError):
        results.Record(suite="s", cell="c", metric="m", status="fine")
    (tmp_path / results.RESULTS_FILE).write_text(json.dumps({"schema": 0}) + "\n")
    with pytest.raises(UserError, match="schema"):
        results.load(tmp_path)
    with pytest.raises(UserError, match="no results file"):
        results.load(tmp_path / "nowhere")
