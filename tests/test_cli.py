import argparse
import subprocess
import sys

from harness.cli import _run_overrides, main


def test_validate_ok_and_errors_are_one_line(tmp_path, capsys):
    assert main(["validate", "suites/pg19.yaml"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmetrics:\n  perplexity: {contexs: [1]}\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 3: metrics.perplexity.contexs" in err and "contexts" in err


def test_validate_says_what_runs_but_measures_something_else(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text("name: x\nfinetune: {steps: 5}\n")
    assert main(["validate", str(suite)]) == 0
    out, err = capsys.readouterr()
    assert err == f"warning: {suite}: line 2: finetune.warmup_steps: 20 is more than finetune.steps (5): the " \
                  "learning rate never reaches finetune.lr (it ends at 25% of it); lower warmup_steps\n"
    assert out.startswith(f"{suite}: ok")


def test_console_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "validate", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "not found" in proc.stderr


def test_command_line_run_settings_keep_a_zero():
    given = dict.fromkeys(("executor", "max_parallel", "nproc", "strategy", "partition", "account", "cpus_per_task",
                           "time_min"))
    assert _run_overrides(argparse.Namespace(**given, gpus_per_node=0)) == {"slurm": {"gpus_per_node": 0}}


def test_report_of_two_dirs_is_a_comparison(tmp_path):
    from harness import results

    for run, ppl in (("base", 10.0), ("head", 12.0)):
        results.append(tmp_path / run, results.Record(suite="s", cell="m/seed0/pretrained/ppl@256",
                                                      metric="perplexity", stage="pretrained", eval_context=256,
                                                      values={"perplexity": ppl}, config_hash="h"))
    assert main(["report", str(tmp_path / "base"), str(tmp_path / "head"), "--out", str(tmp_path / "cmp")]) == 0
    html = (tmp_path / "cmp" / "index.html").read_text()
    assert "Comparison" in html and "[head]" in html


def test_report_of_two_dirs_refuses_one_without_records(tmp_path, capsys):
    """An empty base was still called the base in the header while the comparison took the next run as its base."""
    from harness import results

    results.append(tmp_path / "head", results.Record(suite="s", cell="m/seed0/pretrained/ppl@256", metric="perplexity",
                                                     stage="pretrained", eval_context=256, values={"perplexity": 1.0}))
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / results.RESULTS_FILE).write_text("")
    assert main(["report", str(tmp_path / "base"), str(tmp_path / "head"), "--out", str(tmp_path / "cmp")]) == 2
    assert f"{tmp_path / 'base'}/results.jsonl holds no records" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_report_of_two_dirs_of_one_name_tells_them_apart_by_path(tmp_path):
    from harness import results

    for run in ("a/run", "b/run"):
        results.append(tmp_path / run, results.Record(suite="s", cell="m/seed0/pretrained/ppl@256", metric="perplexity",
                                                      stage="pretrained", eval_context=256, values={"perplexity": 10.0},
                                                      config_hash="h"))
    assert main(["report", str(tmp_path / "a/run"), str(tmp_path / "b/run"), "--out", str(tmp_path / "cmp")]) == 0
    assert f"[{tmp_path / 'b/run'}]" in (tmp_path / "cmp" / "index.html").read_text()


def test_list_names_what_a_suite_can_use(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "model presets (the harness pretrains them): tiny-hybrid\n" in out
    assert "methods: lora, lora_plus, hylora, full\n" in out
    assert "  se_attn: SE-Attn" in out and "[chunk_size=(2048, 4096), block_size=32, top_k=8" in out
    assert "ruler tasks: niah_single_1" in out
    assert "fwe (`all`); opt-in, with their data in `qa_files`: qa_1, qa_2" in out
    assert "suites/pg19.yaml" in out


def test_list_outside_the_checkout_says_where_the_suites_are(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # an installed `harness` run from elsewhere: no suites/ here
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "suites: none in suites/*.yaml here; the shipped ones are in the checkout's suites/" in out


def _cached(kind: str, key: str) -> None:
    from harness import cache

    with cache.build(kind, key, {"what": f"{kind} {key}"}) as d:
        (d / "w.bin").write_bytes(b"w")


def test_cache_rm_removes_every_entry_a_prefix_matches_and_all_with_all(tmp_path, monkeypatch, capsys):
    from harness import cache

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    for kind, key in (("adapter", "ab1"), ("pretrained", "ab2"), ("tokens", "cd3"), ("adapter", "ef4")):
        _cached(kind, key)
    assert main(["cache", "rm", "ab"]) == 0
    assert sorted(e["key"] for e in cache.entries()) == ["cd3", "ef4"]
    assert main(["cache", "rm", "--all"]) == 0
    assert cache.entries() == []
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("removed")] == [
        "removed adapter/ab1", "removed pretrained/ab2", "removed adapter/ef4", "removed tokens/cd3"]


def test_cache_rm_keeps_an_entry_a_build_is_replacing(tmp_path, monkeypatch, capsys):
    """A damaged entry is rebuilt under its key's lock, the old one removed by the build: `cache rm` removing it
    meanwhile would pull it from under that build."""
    import fcntl

    from harness import cache

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    _cached("adapter", "ab1")
    with open(cache.cache_root() / "adapter" / ".lock-ab1", "a") as held:  # a build of ab1 is running
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["cache", "rm", "ab"]) == 0
        assert "kept adapter/ab1: a build of it is running" in capsys.readouterr().out
        assert [e["key"] for e in cache.entries()] == ["ab1"]
    assert main(["cache", "rm", "ab"]) == 0 and cache.entries() == []
    assert "removed adapter/ab1" in capsys.readouterr().out


def test_cache_ls_of_a_key_shows_that_keys_unfinished_builds_only(tmp_path, monkeypatch, capsys):
    from harness import cache

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    for key in ("ab1", "cd3"):
        scratch = cache.cache_root() / "adapter" / f"{cache.SCRATCH}{key}-{cache.this_host()}-1"  # pid 1: alive
        scratch.mkdir(parents=True)
    assert main(["cache", "ls", "ab"]) == 0
    out = capsys.readouterr().out
    assert "ab1" in out and "unfinished build (pid 1 on " in out and "building" in out and "cd3" not in out


def test_cache_shows_and_removes_the_checkpoints_of_interrupted_training(tmp_path, monkeypatch, capsys):
    """The checkpoints a killed training leaves (a 2.7B model's are GBs) were neither listed nor removed."""
    import fcntl

    from harness import cache

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    for key in ("ab1", "cd3"):
        work = cache.cache_root() / "adapter" / f"{cache.WORK}{key}"
        work.mkdir(parents=True)
        (work / "checkpoint.pt").write_bytes(b"x" * 2**20)
    assert main(["cache", "ls", "ab"]) == 0
    out = capsys.readouterr().out
    assert "ab1       1.0 MiB  training checkpoint (the next build of this key resumes from it): " in out
    assert "cd3" not in out
    with open(cache.cache_root() / "adapter" / ".lock-cd3", "a") as held:  # a build of cd3 is training now
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["cache", "ls"]) == 0 and "cd3       1.0 MiB  training checkpoint (a build is using it)" in (
            capsys.readouterr().out)
        assert main(["cache", "rm", "--all"]) == 0
    out = capsys.readouterr().out
    assert "removed adapter/ab1's training checkpoint (1.0 MiB)" in out
    assert "kept adapter/cd3's training checkpoint: a build is using it" in out
    assert [w["key"] for w in cache.work_dirs()] == ["cd3"]
    assert main(["cache", "rm", "cd"]) == 0 and cache.work_dirs() == []


def test_a_bug_exits_3_with_its_traceback_not_1_as_a_regression(tmp_path, monkeypatch, capsys):
    from harness import results
    from harness.report import compare

    for run in ("base", "head"):
        results.append(tmp_path / run, results.Record(suite="s", cell="m/seed0/pretrained/ppl@256", metric="perplexity",
                                                      stage="pretrained", eval_context=256, values={"perplexity": 1.0}))
    monkeypatch.setattr(compare, "compare", lambda *a, **k: 1 / 0)
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "head")]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and err.endswith("(a bug; the traceback is above)\n")
