import json
import os

import pytest

from harness import results
from harness.errors import UserError


def test_append_load_roundtrip_skips_truncated_line(tmp_path):
    results.append(tmp_path, results.Record(suite="s", cell="c1", metric="perplexity", values={"perplexity": 3.0}))
    with open(tmp_path / results.RESULTS_FILE, "a") as f:
        f.write('{"schema": 1, "cell": "trunc')  # a kill mid-write
    recs = results.load(tmp_path)
    assert [r.cell for r in recs] == ["c1"] and isinstance(recs[0], results.Record)
    assert results.to_frame(recs)["perplexity"].tolist() == [3.0]


def test_bad_status_and_old_schema_are_errors(tmp_path):
    with pytest.raises(ValueError):
        results.Record(suite="s", cell="c", metric="m", status="fine")
    (tmp_path / results.RESULTS_FILE).write_text(json.dumps({"schema": 0}) + "\n")
    with pytest.raises(UserError, match="schema"):
        results.load(tmp_path)
    with pytest.raises(UserError, match="no results file"):
        results.load(tmp_path / "nowhere")


SE = "se_attn(chunk_size=64)"


def test_schema_1_records_are_migrated(tmp_path):
    ok = {"schema": 1, "suite": "s", "cell": f"tiny/seed0/lora/{SE}/ppl@512", "metric": "perplexity", "status": "ok",
          "stage": "finetuned", "model": {"preset": "tiny"}, "method": "lora", "backend": SE, "finetune_context": 2048,
          "settings": {"eval_attention": "finetune"}, "env": {"device": "cpu"}, "values": {"perplexity": 3.0}}
    failed = {"schema": 1, "suite": "s", "cell": "tiny/seed1/pretrained/ruler/vt@1024", "metric": "ruler",
              "status": "oom", "stage": "", "model": {}, "method": "none", "backend": "full", "settings": {}}
    eff = {"schema": 1, "suite": "s", "cell": "attention/full/efficiency@64", "metric": "efficiency", "status": "error",
           "stage": "", "model": {}, "backend": "full", "settings": {}}
    (tmp_path / results.RESULTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in (ok, failed, eff)))
    a, b, c = results.load(tmp_path)
    assert all(r.schema == results.SCHEMA_VERSION and r.code == {} for r in (a, b, c))
    # evaluated with the fine-tuning attention: another cell now
    assert a.cell == f"tiny/seed0/lora/{SE}/eval-finetune/ppl@512"
    assert a.variant == {"model": "tiny", "seed": 0, "method": "lora", "backend": SE, "finetune_context": 2048,
                            "stage": "finetuned"}
    # a runner-written failure held nothing but its id: its variant and task come from it
    assert (b.stage, b.model, b.variant["seed"], b.settings["task"]) == ("pretrained", {"preset": "tiny"},
                                                                                     1, "vt")
    assert c.variant is None and c.backend == "full"


def test_current_is_the_last_record_per_run_and_cell():
    def rec(cell, v, **kw):
        return results.Record(suite="s", cell=cell, metric="m", values={"v": v}, **kw)

    recs = [rec("a", 1), rec("b", 2), rec("a", 3, config_hash="new"), rec("a", 4, run="other")]
    assert [r.values["v"] for r in results.current(recs)] == [2, 3, 4]


def test_a_record_with_an_unknown_field_is_a_clear_error(tmp_path):
    results.append(tmp_path, results.Record(suite="s", cell="c1", metric="perplexity"))
    with open(tmp_path / results.RESULTS_FILE, "a") as f:
        f.write(json.dumps({**results.Record(suite="s", cell="c2", metric="m").as_dict(), "colour": "red"}) + "\n")
    with pytest.raises(UserError, match=r"results.jsonl: line 2: record 'c2': unknown field\(s\) colour"):
        results.load(tmp_path)


def test_run_tags_are_not_stored(tmp_path):
    results.append(tmp_path, results.Record(suite="s", cell="c", metric="m", run="base", run_index=1))
    (r,) = results.load(tmp_path)
    assert (r.run, r.run_index) == ("", 0)


def test_read_lines_from_an_offset_sees_only_the_records_appended_after_it(tmp_path):
    """The runner counts an attempt's records from the size the file had when the attempt started."""
    results.append(tmp_path, results.Record(suite="s", cell="before", metric="m"))
    start = (tmp_path / results.RESULTS_FILE).stat().st_size
    results.append(tmp_path, results.Record(suite="s", cell="after", metric="m"))
    assert [(n, rec["cell"]) for n, rec in results.read_lines(tmp_path / results.RESULTS_FILE, start)] == [
        (1, "after")]


def test_an_append_waits_for_the_lock_of_another_writer_and_syncs_its_line(tmp_path, monkeypatch):
    """Jobs finishing at once take turns on the file's lock; each finished line is on disk (fsync) before the job
    goes on, so that a crash of the machine keeps it."""
    import fcntl
    import os
    import threading

    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    path = tmp_path / results.RESULTS_FILE
    with open(path, "ab") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another job, mid-append
        writer = threading.Thread(target=results.append, args=(tmp_path, results.Record(suite="s", cell="c",
                                                                                          metric="m")))
        writer.start()
        writer.join(0.5)
        assert writer.is_alive() and path.read_text() == ""
    writer.join()
    assert [r.cell for r in results.load(tmp_path)] == ["c"] and synced == [str(path)]


def test_a_cells_record_says_what_the_cell_says_of_itself():
    from harness import provenance
    from harness.cells import Cell, Variant

    cell = {**Cell("perplexity", Variant("tiny-hybrid", 1, "lora", "se_attn(top_k=2)", 256), 64,
                   eval_attention="finetune").as_dict(), "hash": "h"}
    rec = results.cell_record("s", cell, status="error", error="job process exited with code 1")
    assert (rec.cell, rec.stage, rec.method, rec.backend, rec.model) == (
        "tiny-hybrid/seed1/lora/se_attn(top_k=2)/eval-finetune/ppl@64", "finetuned", "lora", "se_attn(top_k=2)",
        {"preset": "tiny-hybrid"})
    assert (rec.finetune_context, rec.eval_context, rec.config_hash, rec.settings) == (
        256, 64, "h", {"eval_attention": "finetune"})
    assert (rec.status, rec.error, rec.code["fingerprint"]) == ("error", "job process exited with code 1",
                                                                 provenance.fingerprint("perplexity"))
    timed = {**Cell("efficiency", length=128, backend="sliding_window(window=32)").as_dict(), "hash": "h2",
             "hardware": "cpu"}
    rec = results.cell_record("s", timed)
    assert (rec.backend, rec.stage, rec.model, rec.variant, rec.settings) == (
        "sliding_window(window=32)", "", {}, None, {"eval_attention": "full", "hardware": "cpu"})


def test_schema_1_migration_marks_only_what_was_evaluated_with_the_fine_tuning_attention(tmp_path):
    """A fine-tune evaluated with full attention keeps its id; a runner-written efficiency failure (backend left at
    the default) gets the backend its id names."""
    full = {"schema": 1, "suite": "s", "cell": f"tiny/seed0/lora/{SE}/ppl@512", "metric": "perplexity",
            "stage": "finetuned", "model": {"preset": "tiny"}, "method": "lora", "backend": SE,
            "finetune_context": 2048, "settings": {"eval_attention": "full"}}
    eff = {"schema": 1, "suite": "s", "cell": "attention/sliding_window(window=32)/efficiency@64",
           "metric": "efficiency", "status": "error", "settings": {}}
    (tmp_path / results.RESULTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in (full, eff)))
    a, b = results.load(tmp_path)
    assert a.cell == full["cell"] and b.backend == "sliding_window(window=32)"


def test_a_record_missing_a_field_is_a_clear_error(tmp_path):
    (tmp_path / results.RESULTS_FILE).write_text(json.dumps({"schema": 2, "cell": "c", "metric": "m"}) + "\n")
    with pytest.raises(UserError, match=r"line 1: .*suite.*written by another version"):
        results.load(tmp_path)


def test_the_lock_file_names_only_its_holder(tmp_path):
    (tmp_path / results.LOCK_FILE).write_text("pid 1, started long ago by a run that is gone")
    with results.exclusive(tmp_path):
        held = (tmp_path / results.LOCK_FILE).read_text()
    assert held.startswith(f"pid {os.getpid()}, started ") and "gone" not in held


def test_a_ruler_cells_record_holds_its_task():
    from harness.cells import Cell, Variant

    cell = {**Cell("ruler", Variant("tiny-hybrid", 0), 64, task="vt").as_dict(), "hash": "h"}
    rec = results.cell_record("s", cell, status="oom")
    assert (rec.settings, rec.stage, rec.method, rec.backend) == ({"eval_attention": "full", "task": "vt"},
                                                                  "pretrained", "none", "full")


def test_the_git_commit_is_marked_dirty_where_harness_differs_from_it(tmp_path, monkeypatch):
    import subprocess

    repo = tmp_path / "repo"
    (repo / "harness").mkdir(parents=True)
    (repo / "harness" / "m.py").write_text("x = 1\n")
    (repo / "README").write_text("r\n")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    sha = git("rev-parse", "--short", "HEAD")
    monkeypatch.setattr(results, "__file__", str(repo / "harness" / "results.py"))
    assert results.git_revision() == sha
    (repo / "README").write_text("edited\n")  # outside harness: the code is still the commit's
    assert results.git_revision() == sha
    (repo / "harness" / "m.py").write_text("x = 2\n")
    assert results.git_revision() == f"{sha}-dirty"
    # installed into an untracked directory of the checkout (a virtual environment inside a project): not its code
    (repo / ".venv" / "harness").mkdir(parents=True)
    monkeypatch.setattr(results, "__file__", str(repo / ".venv" / "harness" / "results.py"))
    assert results.git_revision() is None
    (tmp_path / "outside").mkdir()  # outside a checkout, even where tmp_path is inside one (nox's is in the clone)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setattr(results, "__file__", str(tmp_path / "outside" / "results.py"))
    assert results.git_revision() is None
