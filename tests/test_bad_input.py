"""The catalogue of bad input and faults: every case gets a clear answer (an exit code, one message naming the
thing and the fix, no traceback) and loses nothing finished.

Classes: suite files, CLI arguments, results files, the artefact cache, concurrent runs, the regression gate,
the Python API; then faults: a process killed while writing a record or building a cache entry.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from harness import cache, results
from harness.cli import main
from harness.errors import UserError


def cli(capsys, *argv) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `harness ARGV` run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


PLAIN = "name: x\nmethods: []\nmetrics: {perplexity: {contexts: [64]}}\n"  # a valid suite


def suite_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(body))
    return path


# ----------------------------------------------------------------------------- suite files

SUITES = [
    ("malformed yaml", "name: [x\n", r"s\.yaml: malformed YAML"),
    ("not a mapping", "- name: x\n", r"s\.yaml: a suite must be a YAML mapping"),
    ("name missing", "models: [tiny-hybrid]\n", r"line 1: models|name: Field required"),
    ("unknown top-level field", "name: x\nmodel: [tiny-hybrid]\n", r"line 2: model: unknown field \(did you mean"),
    ("unknown nested field", "name: x\nfinetune: {stepz: 3}\n", r"finetune\.stepz: unknown field \(did you mean"),
    ("wrong type", "name: x\nfinetune: {steps: many}\n", r"finetune\.steps: .*integer.*'many'"),
    ("yes for a seed", "name: x\nseeds: [0, yes]\n", r"line 2: seeds: a boolean where a number is due .*yes/no"),
    ("true for a step count", "name: x\nfinetune: {steps: true}\n", r"line 2: finetune\.steps: a boolean where a"),
    ("on for a share", "name: x\npretrain: {recall: {0: on}}\n", r"line 2: pretrain\.recall: a boolean where a number"),
    ("yes for a metric's number", "name: x\nmetrics: {efficiency: {lengths: [64], heads: yes}}\n",
     r"line 2: metrics\.efficiency\.heads: a boolean where a number is due"),
    ("seed beyond torch's", "name: x\nseeds: [0, 18446744073709551616]\n", r"line 2: seeds\.1: Input should be less"),
    ("negative seed", "name: x\npretrain: {seed: -1}\n", r"line 2: pretrain\.seed: Input should be greater than or"),
    ("zero steps", "name: x\nfinetune: {steps: 0}\n", r"finetune\.steps: .*greater than or equal to 1"),
    ("unknown preset", "name: x\nmodels: [tiny-hybrd]\n", r"models: unknown model 'tiny-hybrd' \(did you mean"),
    ("checkpoint dtype typo", "name: x\nmodels: [{name: m, path: /tmp, dtype: bf16}]\n",  # and not "a valid string"
     r"^(?!.*valid string).*line 2: models\.0\.dtype: Input should be 'float32', 'bfloat16' or 'float16' \(got 'bf16'"),
    ("checkpoint field typo", "name: x\nmodels: [{name: m, pth: /tmp}]\n",
     r"models\.0\.pth: unknown field \(did you mean 'path'\?\)"),
    ("unknown method", "name: x\nmethods: [hylorra]\n", r"did you mean 'hylora'"),
    ("unknown backend", "name: x\nbackends: [se_atn]\n", r"(?i)did you mean 'se_attn'"),
    ("bad backend option", "name: x\nbackends: [{se_attn: {chunk_size: 64, block_size: 0}}]\n",
     r"block_size=0 is invalid; allowed: int >= 1"),
    ("unknown backend option", "name: x\nbackends: [{se_attn: {chunk: 64}}]\n", r"has no option 'chunk'.*chunk_size"),
    ("top-level key not a string", "name: x\n~: 3\nyes: 1\n",
     r"line 2: None: Keys should be strings .*; line 3: 1: Keys should be strings \(got True\)"),
    ("backend name not a string", "name: x\nbackends: [{1: {}}, {null: {}}]\n",
     r"line 2: backends\.0: a backend is a name or a one-key mapping"),
    ("grid not a mapping", "name: x\nbackends: [{se_attn: {grid: [1, 2]}}]\n", r"grid: a mapping of option"),
    ("option both plain and in a grid", "name: x\nbackends: [{se_attn: {top_k: 2, grid: {top_k: [4, 8]}}}]\n",
     r"line 2: backends\.0: top_k given both as an option and in grid; keep one"),
    ("backend options not a mapping", "name: x\nbackends: [{sliding_window: 64}]\n",
     r"line 2: backends\.0: the options of sliding_window are a mapping \{option: value\}, got 64"),
    ("bad option of a later backend", "name: x\nbackends:\n  - full\n  - se_attn: {chunk_size: 64, kernel: sdpa}\n",
     r"line 4: backends\.1: attention backend 'se_attn': option kernel='sdpa' is invalid"),
    ("a key given twice", "name: x\nmetrics: {ruler: {lengths: [256]}}\nmetrics: {perplexity: {}}\n",
     r"line 3: 'metrics' is given twice in one mapping, and YAML would silently keep only the last; keep one"),
    ("chunk beyond the context", "name: x\nbackends: [{se_attn: {chunk_size: 4096}}]\n",
     r"line 2: backends: se_attn\(chunk_size=4096\) needs finetune\.context >= 4096 \(it is 2048\)"),
    ("repeated models", "name: x\nmodels: [tiny-hybrid, tiny-hybrid]\n", r"models: each value may appear once"),
    ("repeated methods", "name: x\nmethods: [lora, lora]\n", r"methods: each value may appear once"),
    ("repeated seeds", "name: x\nseeds: [0, 0]\n", r"seeds: each value may appear once; repeated: 0"),
    ("repeated backends", "name: x\nbackends: [full, full]\n", r"backends: each value may appear once"),
    ("unsafe name", "name: ../elsewhere\n", r"name: '\.\./elsewhere': a suite name names its results directory"),
    ("lr key of no backend", "name: x\nbackends: [se_attn]\nfinetune: {lr: {se_atn: 0.1}}\n",
     r"line 3: finetune\.lr\.se_atn: not a backend \(keys: default, full, .*did you mean 'se_attn'"),
    ("lr key of an alias", "name: x\nbackends: [se_attn_nomem]\nfinetune: {lr: {se_attn_nomem: 0.1}}\n",
     r"line 3: finetune\.lr\.se_attn_nomem: an alias takes the LR of the backend it fixes; write 'se_attn'"),
    ("negative lr", "name: x\nfinetune: {lr: -1}\n", r"learning rates must be > 0"),
    ("lr not a number", "name: x\nfinetune: {lr: {default: .nan}}\n", r"line 2: finetune\.lr: learning rates must be"),
    ("infinite lr", "name: x\nfinetune: {lr: .inf}\n", r"line 2: finetune\.lr: learning rates must be > 0 and finite"),
    ("nothing to measure", "name: x\nmetrics: {}\n", r"line 2: metrics: nothing to measure"),
    ("perplexity context 1", "name: x\nmetrics: {perplexity: {contexts: [1]}}\n", r"every context must be >= 2"),
    ("repeated contexts", "name: x\nmetrics: {perplexity: {contexts: [64, 64]}}\n", r"contexts: each value may appear"),
    ("context beyond the stream", "name: x\nmetrics: {perplexity: {contexts: [4096], max_tokens: 1000}}\n",
     r"4096 is longer than the evaluation stream \(max_tokens 1000\)"),
    ("unknown ruler task", "name: x\nmetrics: {ruler: {tasks: [niah_singel_1]}}\n", r"did you mean 'niah_single_1'"),
    ("repeated ruler tasks", "name: x\nmetrics: {ruler: {tasks: [vt, vt]}}\n", r"tasks: each value may appear once"),
    ("ruler length 0", "name: x\nmetrics: {ruler: {lengths: [0]}}\n", r"lengths\.0: .*greater than or equal to 1"),
    ("essay file missing", "name: x\nmetrics: {ruler: {essay_file: essays.json}}\n",
     r"metrics\.ruler\.essay_file: no file 'essays\.json' \(relative paths are taken from the working directory"),
    ("qa task without data", "name: x\nmetrics: {ruler: {tasks: [qa_1]}}\n", r"tasks: qa_1 needs its data.*qa_files"),
    ("efficiency length 0", "name: x\nmetrics: {efficiency: {lengths: [0, 64]}}\n", r"lengths\.0: .*greater than"),
    ("lm_eval include_path missing", "name: x\nmetrics: {lm_eval: {tasks: [t], include_path: nowhere}}\n",
     r"include_path: .*no directory 'nowhere'"),
    ("plugins not a list", "name: x\nplugins: my_metrics\n", r"s\.yaml: line 2: plugins: a list of module names"),
    ("plugin that does not import", "name: x\nplugins: [no_such_module]\n",
     r"plugins\[0\]: cannot import 'no_such_module'.*importable from the working directory"),
    ("infinite alpha", PLAIN + "finetune: {alpha: .inf}\n",
     r"line 4: finetune\.alpha: Input should be a finite number"),
    ("infinite timeout", PLAIN + "run: {timeout: .inf}\n", r"line 4: run\.timeout: Input should be a finite number"),
    ("checkpoint named attention", "name: x\nmodels:\n  - {name: attention, path: /nowhere}\n",
     r"line 3: models\.0\.name: 'attention' begins the cell ids of the attention benchmark"),
    # YAML reads yes/on as true, which pydantic would take for 1: a one-token context or source
    ("boolean checkpoint context", "name: x\nmodels:\n  - {name: m, path: /nowhere, context: yes}\n",
     r"line 3: models\.0\.context: Input should be a valid integer \(got True\)"),
    ("boolean max_tokens", PLAIN + "data: {train: {source: embedded, max_tokens: on}}\n",
     r"line 4: data\.train\.max_tokens: Input should be a valid integer \(got True\)"),
    # the embedded corpus's splits are fixed: a typo is an invalid suite (it was "missing on this machine",
    # with "the suite is valid", and named neither the file nor the field)
    ("embedded split typo", PLAIN + "data: {eval: {source: embedded, split: tset}}\n",
     r"line 4: data\.eval\.split: the embedded corpus has no split 'tset' \(did you mean 'test'\?\); its splits: "
     r"train, validation, test"),
]


@pytest.mark.parametrize("body,message", [(b, m) for _, b, m in SUITES], ids=[c for c, _, _ in SUITES])
def test_bad_suite_file(tmp_path, capsys, body, message):
    code, out = cli(capsys, "validate", suite_file(tmp_path, body))
    assert code == 2 and "Traceback" not in out and out.count("\n") == 1, out
    assert re.search(message, out), out


def test_missing_suite_file(capsys):
    code, out = cli(capsys, "validate", "nowhere.yaml")
    assert code == 2 and "nowhere.yaml: suite file not found (suites live in suites/*.yaml)" in out


def test_a_suite_file_that_is_not_utf8(tmp_path, capsys):
    (tmp_path / "s.yaml").write_bytes(b"name: caf\xe9\n")  # Latin-1, as some editors save it
    code, out = cli(capsys, "validate", tmp_path / "s.yaml")
    assert code == 2 and "Traceback" not in out and out.count("\n") == 1, out
    assert "s.yaml: cannot read it as UTF-8 text ('utf-8' codec can't decode byte 0xe9 in position 9" in out, out


def test_a_directory_for_a_suite_file(tmp_path, capsys):
    code, out = cli(capsys, "run", tmp_path)
    assert code == 2 and f"{tmp_path}: a directory, not a suite file; name one of its YAML files" in out


def test_a_ruler_length_too_short_for_its_task_is_caught_before_running(tmp_path, capsys):
    s = suite_file(tmp_path, "name: x\nmethods: []\nmetrics: {ruler: {tasks: [vt], lengths: [256]}}\n")
    for command in (["run", s, "--dry-run"], ["validate", s]):  # validate checks what run checks before its jobs
        code, out = cli(capsys, *command)
        assert code == 2 and "Traceback" not in out
        assert re.search(rf"{re.escape(str(s))}: line 3: metrics\.ruler\.lengths \(in models\.tiny-hybrid's tokens\): "
                         r"RULER task 'vt' cannot fit in length 256.*use length >= \d+", out), command


def test_validate_says_what_a_run_here_would_miss(tmp_path, capsys):
    s = suite_file(tmp_path, f"name: x\nmethods: []\ndata: {{eval: {{source: text, path: {tmp_path}/none}}}}\n"
                             "metrics: {perplexity: {contexts: [64]}}\n")
    code, out = cli(capsys, "validate", s)
    assert code == 2 and "Traceback" not in out
    assert "missing data.eval: " in out and f"{s}: missing on this machine: data.eval (said above)" in out
    code, out = cli(capsys, "validate", suite_file(tmp_path, "name: x\nmethods: []\nmetrics: {perplexity: {}}\n"))
    assert code == 0 and out.endswith("ok (suite 'x': 6 cells in 2 jobs)\n"), out


def test_a_ruler_length_is_checked_with_every_sample_the_cells_will_build(tmp_path, capsys):
    # at 288 tokens the one sample of seed 42 that the check once built fits; the cells' (seed 0) do not
    s = suite_file(tmp_path, "name: x\nmethods: []\nmetrics: {ruler: {tasks: [niah_single_1], lengths: [288, 512], "
                             "samples: 2}}\n")
    code, out = cli(capsys, "run", s, "--dry-run")
    assert code == 2 and "Traceback" not in out
    assert "RULER task 'niah_single_1' cannot fit in length 288: it needs at least 291" in out


def test_a_ruler_length_below_the_generation_budget_says_the_length_a_prompt_needs(tmp_path, capsys):
    """At or below the task's 128 new tokens the message said "at least 129", the budget alone, not the 291 that
    the shortest prompt of the embedded tokenizer needs."""
    s = suite_file(tmp_path, "name: x\nmethods: []\nmetrics: {ruler: {tasks: [niah_single_1], lengths: [128]}}\n")
    code, out = cli(capsys, "run", s, "--dry-run")
    assert code == 2 and "cannot fit in length 128: it needs at least 291" in out, out


def test_a_job_prints_a_user_error_as_one_line_and_a_bug_with_its_traceback(capsys):
    from harness.job import _print_failure

    for e in (UserError("metrics.x: bad; fix: y"), RuntimeError("a bug")):
        try:
            raise e
        except Exception as caught:  # noqa: BLE001
            _print_failure(caught)
    err = capsys.readouterr().err
    assert err.startswith("error: metrics.x: bad; fix: y\nTraceback") and err.count("Traceback") == 1, err


def test_only_matching_nothing_is_an_error(tmp_path, capsys):
    code, out = cli(capsys, "run", suite_file(tmp_path, PLAIN), "--only", "*ppl@9999", "--dry-run")
    assert code == 2 and "--only '*ppl@9999' matches none of the suite's cells" in out and "--dry-run" in out


def test_a_suite_that_plans_no_cell_is_an_error(tmp_path, capsys):
    s = suite_file(tmp_path, "name: x\nbackends: []\nmetrics: {efficiency: {lengths: [64]}}\n")
    code, out = cli(capsys, "run", s, "--dry-run")
    assert code == 2 and "the suite plans no cell" in out and "check `metrics`, `methods` and `backends`" in out


# ----------------------------------------------------------------------------- data directories

@pytest.mark.parametrize("rows,message", [
    ('{"text": "a"}\n{"body": "b"}\n', r"data.train.field: .*t.jsonl:2 has no text field 'text' \(fields: body\)"),
    ("\n", r"no text to tokenize"),
], ids=["line without the field", "empty source"])
def test_bad_training_text_stops_the_run_before_any_job(tmp_path, capsys, rows, message):
    (tmp_path / "t.jsonl").write_text(rows)
    body = "name: x\nmethods: [lora]\nmetrics: {perplexity: {contexts: [64]}}\n" \
           f"data: {{train: {{source: jsonl, path: {tmp_path / 't.jsonl'}}}}}\n"
    code, out = cli(capsys, "run", suite_file(tmp_path, body))
    assert code == 2 and "Traceback" not in out and re.search(message, out), out
    assert not (tmp_path / "reports" / "x" / results.RESULTS_FILE).exists()  # nothing ran
    assert not [p for p in (tmp_path / "cache" / "tokens").glob("*") if not p.name.startswith(".lock-")]  # nothing
    # half-written (the lock file of the key stays)


def test_an_eval_text_field_that_is_not_there_stops_the_run_before_any_job(tmp_path, capsys):
    """It failed every cell, each with the same message, and did not name the suite's field."""
    (tmp_path / "e.jsonl").write_text('{"body": "a"}\n')
    body = f"name: x\nmetrics: {{perplexity: {{contexts: [64]}}}}\ndata: {{eval: {{source: jsonl, path: " \
           f"{tmp_path / 'e.jsonl'}}}}}\n"
    code, out = cli(capsys, "run", suite_file(tmp_path, body))
    assert code == 2 and "Traceback" not in out, out
    assert re.search(r"data.eval.field: .*e.jsonl:1 has no text field 'text' \(fields: body\); fix: set "
                     r"data.eval.field", out), out
    assert not (tmp_path / "reports" / "x" / results.RESULTS_FILE).exists()  # nothing ran


@pytest.mark.parametrize("setting,message", [
    # each says which setting gave the directory: the fix names them all
    ({"flag": "emptypg"}, r"PG-19 split folder .*emptypg/test not found \(splits present: none\).* \(the PG-19 "
                          r"directory emptypg came from --pg19\)"),
    ({"env": "no/such/pg19"}, r"PG-19 directory no/such/pg19 does not exist; fix: point HARNESS_PG19_DIR, "
                              r"`harness run --pg19 DIR` or a suite's data.pg19 at a folder.* came from "
                              r"\$HARNESS_PG19_DIR\)"),
    ({"suite": "no/such/pg19"}, r"PG-19 directory no/such/pg19 does not exist.* came from the suite's data.pg19\)"),
    ({"flag": "pg", "split": "dev"}, r"PG-19 split folder .*pg/dev not found \(splits present: test\)"),
], ids=["empty directory", "env var to nowhere", "suite field to nowhere", "missing split"])
def test_bad_pg19_directory(tmp_path, capsys, monkeypatch, setting, message):
    (tmp_path / "emptypg").mkdir()
    (tmp_path / "pg" / "test").mkdir(parents=True)
    (tmp_path / "pg" / "test" / "1.txt").write_text("A book.")
    body = PLAIN + (f"data: {{pg19: {setting['suite']}}}\n" if "suite" in setting else "") \
        + (f"data: {{eval: {{source: pg19, split: {setting['split']}}}}}\n" if "split" in setting else "")
    if "env" in setting:
        monkeypatch.setenv("HARNESS_PG19_DIR", setting["env"])
    argv = ["run", suite_file(tmp_path, body), "--dry-run"] + (["--pg19", setting["flag"]] if "flag" in setting else [])
    code, out = cli(capsys, *argv)
    assert code == 2 and "Traceback" not in out and re.search(message, out), out


# ----------------------------------------------------------------------------- CLI arguments

ARGUMENTS = [
    (["bench", "attention", "--lengths", "abc"], r"argument --lengths: 'abc' is not an integer"),
    (["bench", "attention", "--lengths", "0"], r"argument --lengths: 0 must be >= 1"),
    (["bench", "attention", "--lengths", "-8"], r"argument --lengths: -8 must be >= 1"),
    (["bench", "attention", "--lengths", "64,"], r"argument --lengths: '64,': give comma-separated integers"),
    (["bench", "attention", "--lengths", "64,64"], r"argument --lengths: '64,64' repeats a value"),
    (["bench", "attention", "--repeats", "0"], r"argument --repeats: 0 must be >= 1"),
    (["bench", "attention", "--heads", "two"], r"argument --heads: 'two' is not an integer"),
    (["bench", "attention", "--head-dim", "-1"], r"argument --head-dim: -1 must be >= 1"),
    (["bench", "attention", "--backends", "full,s2_attn,full"], r"argument --backends: 'full,s2_attn,full' repeats a "),
    (["bench", "attention", "--backends", "full,se_atn"], r"argument --backends: unknown attention backend 'se_atn'"),
    (["compare", "a", "b", "--ppl-rtol", "nan"], r"ppl_rtol \(--ppl-rtol\) = nan: must be a finite number > 0"),
    (["compare", "a", "b", "--ppl-rtol", "-0.1"], r"ppl_rtol \(--ppl-rtol\) = -0\.1: must be a finite number > 0"),
    (["compare", "a", "b", "--time-ratio", "0.5"], r"time_ratio \(--time-ratio\) = 0\.5: must be a finite number >= 1"),
    (["compare", "a", "b", "--memory-ratio", "inf"], r"memory_ratio \(--memory-ratio\) = inf: must be a finite"),
    (["compare", "a", "b", "--alpha", "2"], r"alpha \(--alpha\) = 2\.0: must be a finite number in \(0, 1\)"),
    (["compare", "a", "b", "--alpha", "0"], r"alpha \(--alpha\) = 0(\.0)?: must be a finite number in \(0, 1\)"),
    (["compare", "a", "b", "--summary", "."], r"argument --summary: \. is a directory; give a file"),
    (["compare", "--rev", "HEAD", "--calibrate"], r"compare: --rev REV times .* they do not go together"),
    (["compare", "a", "b", "--summary", "missing/dir/summary.md"], r"argument --summary: directory missing/dir does"),
    (["run", "s.yaml", "--pg19", "no/such/dir"], r"argument --pg19: no directory no/such/dir"),
    (["run", "s.yaml", "--gpus-per-node", "-1"], r"argument --gpus-per-node: -1 must be >= 0"),  # 0: CPU-only jobs
    (["run", "s.yaml", "--gpus-per-node", "two"], r"argument --gpus-per-node: 'two' is not an integer"),
    (["cache", "rm", ""], r"cache rm: an empty key would match every entry"),
    (["cache", "rm"], r"cache rm: name keys \(or prefixes\) to remove, or --all"),
    (["cache", "rm", "feedbeef"], r"cache rm: no entry matches feedbeef; see `harness cache ls`"),
    (["cache", "rm", "feedbeef", "--all"], r"cache rm: name keys \(or prefixes\) to remove, or pass --all for every "),
    (["cache", "ls", "--all"], r"cache ls: --all is for `cache rm`; `cache ls` lists every entry"),
    (["cache", "ls", " "], r"cache ls: an empty key would match every entry; name keys \(or prefixes\)$"),
    (["run", "s.yaml", "--status", "--dry-run"], r"run: --status lists the jobs .*, --dry-run the cells .*; give one"),
    (["report", "no_results_here"], r"no_results_here/results\.jsonl: no results file here; run a suite first"),
    (["compare", "no_base", "no_head"], r"no_base/results\.jsonl: no results file here"),
]


@pytest.mark.parametrize("argv,message", ARGUMENTS, ids=[" ".join(a) for a, _ in ARGUMENTS])
def test_bad_argument(capsys, argv, message):
    code, out = cli(capsys, *argv)
    assert code == 2 and "Traceback" not in out, out
    assert re.search(message, out), out


def test_slurm_flags_the_executor_would_ignore_are_refused(tmp_path, capsys):
    suite = suite_file(tmp_path, "name: x\nbackends: [full]\nmetrics: {efficiency: {lengths: [64]}}\n")
    code, out = cli(capsys, "run", suite, "--dry-run", "--partition", "gpu", "--time-min", "5")
    assert code == 2 and "--partition, --time-min: Slurm settings, but this run's executor is local" in out, out
    code, out = cli(capsys, "run", suite, "--dry-run", "--executor", "submitit-local", "--account", "lab",
                    "--time-min", "5")
    assert code == 2 and out.startswith("error: --account: Slurm settings, but this run's executor is submitit-lo")
    for given in (["submitit-local", "--time-min", "5"], ["slurm", "--partition", "gpu", "--time-min", "5"]):
        code, out = cli(capsys, "run", suite, "--dry-run", "--executor", *given)
        assert code == 0 and "attention/full" in out, out


@pytest.mark.parametrize("command", ["run s.yaml", "report results"])
def test_out_onto_a_file(tmp_path, capsys, command):
    (tmp_path / "afile").write_text("x")
    code, out = cli(capsys, *command.split(), "--out", "afile")
    assert code == 2 and "argument --out: afile is a file; give a directory" in out


def test_a_run_whose_cells_failed_exits_1_and_says_where(tmp_path, capsys, monkeypatch):
    from harness import runner

    report = tmp_path / "out" / "index.html"
    monkeypatch.setattr(runner, "run_suite", lambda *a, **k: runner.Outcome(report, 5, {"error": 2, "oom": 1}))
    code, out = cli(capsys, "run", "s.yaml")
    assert code == 1 and "3 of 5 cells failed (error 2, oom 1)" in out and "Failed cells" in out
    assert str(tmp_path / "out" / "results.jsonl") in out and "--retry-failed" in out


# ----------------------------------------------------------------------------- results files

def record(cell: str, ppl: float = 10.0, **kw) -> results.Record:
    return results.Record(suite="s", cell=cell, metric="perplexity", values={"perplexity": ppl},
                          config_hash="h", **kw)


def write_lines(out: Path, *lines: str | bytes) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / results.RESULTS_FILE, "ab") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else line.encode())


def test_a_record_cut_off_mid_write_is_skipped_and_the_next_one_kept(tmp_path, capsys):
    out = tmp_path / "r"
    results.append(out, record("a"))
    write_lines(out, '{"schema": 2, "suite": "s", "cell": "b", "met')  # a kill mid-write: no newline
    results.append(out, record("c"))  # the cell measured again: must not join the half line
    assert [r.cell for r in results.load(out)] == ["a", "c"]
    err = capsys.readouterr().err
    assert "1 line(s) hold no record (line 2): a write cut off by a kill" in err


@pytest.mark.parametrize("junk", ["42\n", '"text"\n', "[1, 2]\n", "null\n", b"\x00\xff\xfe garbage\n", "\n"],
                         ids=["int", "string", "list", "null", "bytes", "blank"])
def test_junk_lines_are_skipped_with_a_warning_and_report_renders(tmp_path, capsys, junk):
    out = tmp_path / "r"
    results.append(out, record("a"))
    write_lines(out, junk)
    results.append(out, record("b"))
    code, text = cli(capsys, "report", out)
    assert code == 0 and "Traceback" not in text and (out / "index.html").is_file()
    assert junk.strip() == b"" or "hold no record (line 2)" in text
    assert [r.cell for r in results.load(out)] == ["a", "b"]


def test_a_record_from_another_schema_names_the_line(tmp_path, capsys):
    out = tmp_path / "r"
    results.append(out, record("a"))
    write_lines(out, json.dumps({**record("b").as_dict(), "schema": 9}) + "\n")
    code, text = cli(capsys, "report", out)
    assert code == 2 and "results.jsonl: line 2: record has schema 9, this harness reads 1 to 2" in text


def test_a_record_with_a_field_this_harness_does_not_know(tmp_path, capsys):
    out = tmp_path / "r"
    write_lines(out, json.dumps({**record("a").as_dict(), "colour": "red"}) + "\n")
    code, text = cli(capsys, "report", out)
    assert code == 2 and "line 1: record 'a': unknown field(s) colour" in text


def test_a_bad_status_in_a_record_is_an_error_naming_it(tmp_path, capsys):
    out = tmp_path / "r"
    write_lines(out, json.dumps({**record("a").as_dict(), "status": "fine"}) + "\n")
    code, text = cli(capsys, "report", out)
    assert code == 2 and "line 1: status 'fine' not in" in text


# ----------------------------------------------------------------------------- the gate

def test_a_gate_that_compared_nothing_fails(tmp_path, capsys):
    for d in ("a", "b"):
        write_lines(tmp_path / d, "")
    code, out = cli(capsys, "compare", tmp_path / "a", tmp_path / "b")
    assert code == 2 and "nothing was compared" in out and "No regressions" not in out


def test_a_gate_whose_settings_all_differ_compared_nothing(tmp_path, capsys):
    results.append(tmp_path / "a", record("x"))
    results.append(tmp_path / "b", results.Record(suite="s", cell="x", metric="perplexity",
                                                  values={"perplexity": 10.0}, config_hash="other"))
    code, out = cli(capsys, "compare", tmp_path / "a", tmp_path / "b")
    assert code == 2 and "nothing was compared (1 skipped)" in out


def test_a_cell_missing_from_head_is_a_regression(tmp_path, capsys):
    results.append(tmp_path / "a", record("x"))
    results.append(tmp_path / "a", record("y"))
    results.append(tmp_path / "b", record("x"))
    code, out = cli(capsys, "compare", tmp_path / "a", tmp_path / "b")
    assert code == 1 and "missing in head" in out


def test_only_narrows_the_gate_to_the_cells_it_matches(tmp_path, capsys):
    results.append(tmp_path / "a", record("x/ppl@512", 10.0))
    results.append(tmp_path / "a", record("y/ppl@512", 10.0))
    results.append(tmp_path / "b", record("x/ppl@512", 10.0))
    results.append(tmp_path / "b", record("y/ppl@512", 15.0))
    assert cli(capsys, "compare", tmp_path / "a", tmp_path / "b")[0] == 1
    code, out = cli(capsys, "compare", tmp_path / "a", tmp_path / "b", "--only", "x/*")
    assert code == 0 and "1 ok" in out and "y/" not in out
    code, out = cli(capsys, "compare", tmp_path / "a", tmp_path / "b", "--only", "z*")
    assert code == 2 and f"--only 'z*' matches no cell of {tmp_path / 'a'} or {tmp_path / 'b'}" in out


@pytest.mark.parametrize("flag", [["--suite", "s.yaml"], ["--min-repeats", "5"], ["--min-seconds", "2"]])
def test_timing_flags_without_rev_are_refused_not_ignored(tmp_path, capsys, flag):
    results.append(tmp_path / "a", record("x", 10.0))
    results.append(tmp_path / "b", record("x", 10.0))
    code, out = cli(capsys, "compare", tmp_path / "a", tmp_path / "b", *flag)
    assert code == 2 and f"compare: {flag[0]} go with --rev or --calibrate" in out


@pytest.mark.parametrize("flag", [["--ppl-rtol", "0.01"], ["--memory-ratio", "1.2"]])
def test_record_thresholds_with_rev_are_refused_not_ignored(capsys, monkeypatch, flag):
    from harness.timing import gate

    monkeypatch.setattr(gate, "timing_gate", lambda *a, **k: pytest.fail("timed with the flag ignored"))
    code, out = cli(capsys, "compare", "--rev", "HEAD", *flag)
    assert code == 2 and f"compare: {flag[0]} judge stored records (BASE HEAD); --rev and --calibrate" in out


def test_a_50_percent_perplexity_rise_fails_the_gate(tmp_path, capsys):
    results.append(tmp_path / "a", record("x", 10.0))
    results.append(tmp_path / "b", record("x", 15.0))
    assert cli(capsys, "compare", tmp_path / "a", tmp_path / "b")[0] == 1


def test_the_summary_file_gets_the_verdict(tmp_path, capsys):
    results.append(tmp_path / "a", record("x", 10.0))
    results.append(tmp_path / "b", record("x", 10.0))
    code, _ = cli(capsys, "compare", tmp_path / "a", tmp_path / "b", "--summary", tmp_path / "summary.md")
    assert code == 0 and "1 ok" in (tmp_path / "summary.md").read_text()


# ----------------------------------------------------------------------------- the cache

def built(kind: str, key: str, content: bytes = b"weights" * 100) -> Path:
    with cache.build(kind, key, {"preset": "p"}) as d:
        (d / "model.safetensors").write_bytes(content)
    return cache.lookup(kind, key)


def test_a_truncated_artefact_is_detected_and_rebuilt(capsys):
    path = built("pretrained", "k1")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert cache.lookup("pretrained", "k1") is None  # so the caller rebuilds it
    err = capsys.readouterr().err
    assert "cache entry pretrained/k1 is damaged (model.safetensors has 350 bytes, its build wrote 700)" in err
    assert built("pretrained", "k1") is not None


def test_an_overwritten_or_missing_artefact_file_is_detected(capsys):
    path = built("pretrained", "k2")
    (path / "model.safetensors").write_bytes(b"W" * 700)  # same size, other bytes
    assert cache.lookup("pretrained", "k2") is None and "differs from what its build wrote" in capsys.readouterr().err
    path = built("pretrained", "k3")
    (path / "model.safetensors").unlink()
    assert cache.lookup("pretrained", "k3") is None and "model.safetensors is missing" in capsys.readouterr().err


def test_cache_ls_lists_the_entries_of_the_keys_given(capsys):
    for key in ("ab1", "ab2", "cd3"):
        built("adapter", key)
    code, out = cli(capsys, "cache", "ls", "ab", "cd3")
    assert code == 0 and all(f" {k} " in out for k in ("ab1", "ab2", "cd3"))
    code, out = cli(capsys, "cache", "ls", "ab2")
    assert code == 0 and " ab2 " in out and " ab1 " not in out and " cd3 " not in out


def test_a_corrupt_meta_json_is_listed_and_removable(capsys):
    path = built("adapter", "k4")
    (path / cache.META).write_text("{not json")
    code, out = cli(capsys, "cache", "ls")
    assert code == 0 and "k4" in out and "damaged meta.json" in out
    code, out = cli(capsys, "cache", "rm", "k4")
    assert code == 0 and "removed adapter/k4" in out and not path.exists()


def test_an_unloadable_entry_names_its_key_and_the_fix():
    from harness.artefacts import _load

    path = built("pretrained", "k5")

    def broken():
        raise RuntimeError("incomplete metadata")

    with pytest.raises(UserError, match=r"cache entry pretrained/k5 .* cannot be loaded \(RuntimeError: incomplete "
                                        r"metadata\); remove it with `harness cache rm k5`"):
        _load(path, broken)


def test_an_unwritable_cache_fails_before_running(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "afile" / "cache"))
    code, out = cli(capsys, "run", suite_file(tmp_path, PLAIN))
    assert code == 2 and "the artefact cache" in out and "is not writable" in out and "set HARNESS_CACHE" in out


# ----------------------------------------------------------------------------- concurrent runs

def test_a_second_run_on_the_same_out_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    with results.exclusive(tmp_path / "out"):
        code, out = cli(capsys, "run", suite_file(tmp_path, PLAIN), "--out", tmp_path / "out")
    assert code == 2 and f"{tmp_path / 'out'} is in use by another harness run (pid {os.getpid()}" in out
    assert "pass another --out" in out


def test_the_lock_goes_with_its_process(tmp_path):
    (tmp_path / "out").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from harness import results
        with results.exclusive({str(tmp_path / 'out')!r}):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"pid {holder.pid}"):
        with results.exclusive(tmp_path / "out"):
            pass
    holder.kill()
    holder.wait()
    with results.exclusive(tmp_path / "out"):  # a killed holder leaves nothing behind that blocks
        pass


# ----------------------------------------------------------------------------- the Python API

def test_attention_on_integer_or_bool_tensors():
    from harness.attention import attend

    for dtype in (torch.long, torch.bool):
        x = torch.ones(1, 1, 4, 8, dtype=dtype)
        with pytest.raises(UserError, match=f"one floating-point dtype; got {dtype}"):
            attend(x, x, x)
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(UserError, match="got torch.float32, torch.float64"):
        attend(q, q.double(), q)


@pytest.mark.parametrize("backend,options", [("full", {}), ("sliding_window", {"window": 4}), ("s2_attn", {}),
                                             ("se_attn", {"chunk_size": 8, "block_size": 4, "top_k": 2})])
def test_attention_with_nan_inputs_says_so_instead_of_spreading_it(backend, options):
    from harness.attention import attend

    q, k, v = (torch.randn(1, 2, 32, 8) for _ in range(3))
    k[0, 0, 20] = float("nan")
    with pytest.raises(UserError, match=f"attention backend '{backend}' got NaN or inf in k: the model diverged"):
        attend(q, k, v, backend, **options)


def test_attention_with_inf_inputs_says_so_and_finite_inputs_whose_sum_overflows_run():
    from harness.attention import attend

    q, k, v = (torch.randn(1, 2, 32, 8) for _ in range(3))
    q[0, 1, 3, 2] = -float("inf")
    with pytest.raises(UserError, match="got NaN or inf in q: the model diverged"):
        attend(q, k, v)
    q[0, 1, 3, 2] = 0.0
    v[0, :, 0, 0] = 2e38  # one per head: every value and each head's attention finite, their fp32 sum is not
    assert torch.isinf(v.sum()) and attend(q, k, v).isfinite().all()


def test_attention_with_mismatched_shapes():
    from harness.attention import attend

    with pytest.raises(UserError, match=r"attention expects q \(B, Hq, Lq, d\)"):
        attend(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))


def test_backend_options_through_the_api():
    from harness.attention import Backend

    with pytest.raises(UserError, match="block_size=0 is invalid"):
        Backend("se_attn", block_size=0)
    with pytest.raises(UserError, match="unknown attention backend 'sparse'"):
        Backend("sparse")


@pytest.mark.parametrize("method,kw,message", [
    (None, {}, "unknown fine-tuning method None"),
    ("lorra", {}, "did you mean 'lora'"),
    ("lora", {"rank": 0}, "LoRA rank must be an integer >= 1"),
    ("lora", {"alpha": "big"}, "alpha > 0"),
])
def test_apply_method_bad_arguments(method, kw, message):
    from harness.finetune.methods import apply_method
    from harness.models import HybridForCausalLM, preset_config

    with pytest.raises(UserError, match=re.escape(message)):
        apply_method(HybridForCausalLM(preset_config("tiny-hybrid")), method, **kw)


def test_thresholds_through_the_api():
    from harness.report.compare import Thresholds

    with pytest.raises(UserError, match="ppl_rtol"):
        Thresholds(ppl_rtol=float("nan"))
    with pytest.raises(UserError, match="alpha"):
        Thresholds(alpha=0)


# ----------------------------------------------------------------------------- faults: killed mid-write

WRITER = """
import sys
from harness import results
out, n = sys.argv[1], 0
while True:
    results.append(out, results.Record(suite="s", cell=f"c{n}", metric="m", values={"pad": "x" * 4000}))
    if n == 0:
        print("writing", flush=True)
    n += 1
"""


def test_a_process_killed_while_appending_loses_no_finished_record(tmp_path):
    out = tmp_path / "r"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    for delay in (0.0, 0.05, 0.1, 0.2):
        proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        written = [r for r in results.load(out) if r.cell.startswith("c")]
        assert written and all(r.values["pad"] == "x" * 4000 for r in written)  # nothing half-written is read
        results.append(out, results.Record(suite="s", cell="after", metric="m"))
        assert results.load(out)[-1].cell == "after"  # and the next record is never glued to a half line


BUILDER = """
import sys, time
from harness import cache
with cache.build("pretrained", "slow") as d:
    (d / "model.safetensors").write_bytes(b"w" * 1000)
    print("building", flush=True)
    time.sleep(60)
"""


def test_a_process_killed_while_building_a_cache_entry_leaves_nothing_that_is_read(tmp_path, capsys):
    script = tmp_path / "builder.py"
    script.write_text(BUILDER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "HARNESS_CACHE": str(tmp_path / "cache")})
    assert proc.stdout.readline().strip() == "building"
    proc.kill()
    proc.wait()
    assert cache.lookup("pretrained", "slow") is None  # the half-built entry is never taken as done
    code, out = cli(capsys, "cache", "ls")
    assert code == 0 and f"unfinished build (pid {proc.pid} on " in out and "killed; the next build" in out
    assert built("pretrained", "slow") is not None  # and building it again works, clearing the killed one's files
    assert [e["key"] for e in cache.entries()] == ["slow"] and not cache.unfinished()

