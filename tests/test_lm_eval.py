"""The lm_eval metric: local offline lm-eval tasks on a tiny random hybrid, the suite field, the report table."""

import os

# Offline before `datasets` is first imported (it reads these at import): nothing here may touch the network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from harness.data import default_tokenizer  # noqa: E402
from harness.errors import UserError  # noqa: E402
from harness.metrics.lm_eval import evaluate_lm_eval, local_tasks_fingerprint, task_manager  # noqa: E402
from harness.models import HybridForCausalLM, preset_config  # noqa: E402
from harness.plan import plan  # noqa: E402
from harness.report.lm_eval import lm_eval_section  # noqa: E402
from harness.suite import load_suite  # noqa: E402

TASKS = Path(__file__).parent / "data" / "lm_eval"
ROWS = {"harness_mc": 6, "harness_gen": 3}


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    config = preset_config("tiny-hybrid")
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    return HybridForCausalLM(config).eval()


@pytest.fixture(scope="module")
def manager():
    return task_manager(list(ROWS), str(TASKS))


@pytest.fixture(scope="module")
def mc(model, tok, manager):
    # batch_size 4: loglikelihood batches are right-padded (several continuation lengths per batch)
    return evaluate_lm_eval(model, tok, "harness_mc", manager, batch_size=4, max_length=128)


@torch.inference_mode()
def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    ctx, whole = tok.encode(context), tok.encode(context + continuation)
    logprobs = model(torch.tensor([whole])).logits[0, :-1].log_softmax(-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def test_multiple_choice_records_metrics_and_counts(mc, manager):
    assert set(manager.all_tasks) == set(ROWS)  # the local tasks alone: lm-eval's own were not indexed
    assert set(mc.values) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples", "samples_available"}
    assert mc.values["samples"] == mc.values["samples_available"] == ROWS["harness_mc"] == len(mc.samples)
    assert 0 <= mc.values["acc"] <= 1 and 0 <= mc.values["acc_norm"] <= 1 and mc.values["acc_stderr"] > 0
    assert mc.settings["output_type"] == "multiple_choice" and mc.settings["num_fewshot"] == 0
    assert mc.dataset == {"name": "harness_mc (custom dataset)", "split": "test"}


def test_loglikelihoods_are_the_models(mc, model, tok):
    """lm-eval's scores of every choice equal the model's own, and acc follows from them."""
    correct = []
    for s in mc.samples:
        doc = _rows("multiple_choice.jsonl")[s["doc_id"]]
        context = f"Question: {doc['question']}\nAnswer:"
        ours = [_loglikelihood(model, tok, context, f" {c}") for c in doc["choices"]]
        theirs = [ll for ll, _greedy in s["response"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        correct.append(max(range(len(ours)), key=ours.__getitem__) == doc["answer"] == s["target"])
    assert mc.values["acc"] == pytest.approx(sum(correct) / len(correct))


def test_a_lora_wrapped_model_is_scored_as_itself(tok, manager):
    """A fine-tuned variant is a PeftModel around the hybrid: HFLM must score through the adapter."""
    from harness.finetune.methods import apply_method

    config = preset_config("tiny-hybrid")
    config.vocab_size = len(tok)
    torch.manual_seed(1)
    peft_model, _ = apply_method(HybridForCausalLM(config), "lora")
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero (the adapter a no-op): make it count
            torch.nn.init.normal_(p, std=0.5)
    peft_model.eval()
    res = evaluate_lm_eval(peft_model, tok, "harness_mc", manager, limit=1, max_length=128)
    doc = _rows("multiple_choice.jsonl")[0]
    with peft_model.disable_adapter():
        base = _loglikelihood(peft_model, tok, f"Question: {doc['question']}\nAnswer:", f" {doc['choices'][0]}")
    ours = _loglikelihood(peft_model, tok, f"Question: {doc['question']}\nAnswer:", f" {doc['choices'][0]}")
    assert res.samples[0]["response"][0][0] == pytest.approx(ours, abs=1e-4) and abs(ours - base) > 1e-2


def test_generation_runs_unbatched_and_matches_greedy_decoding(model, tok, manager):
    # batch_size 3 would left-pad the prompts, which HybridModel rejects: generation must run one at a time
    res = evaluate_lm_eval(model, tok, "harness_gen", manager, batch_size=3, max_length=128)
    assert set(res.values) == {"exact_match", "exact_match_stderr", "samples", "samples_available"}
    assert res.values["samples"] == ROWS["harness_gen"] and 0 <= res.values["exact_match"] <= 1
    for s in res.samples:
        ids = torch.tensor([tok.encode(_rows("generation.jsonl")[s["doc_id"]]["prompt"])])
        out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert s["response"] == [tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]]


def test_limit_and_unknown_task(model, tok, manager):
    res = evaluate_lm_eval(model, tok, "harness_mc", manager, limit=2, max_length=128)
    assert res.values["samples"] == 2 and res.values["samples_available"] == ROWS["harness_mc"]
    with pytest.raises(UserError, match=r"unknown task 'harness_mcq' \(did you mean 'harness_mc'\?\).*include_path"):
        evaluate_lm_eval(model, tok, "harness_mcq", manager)


def test_num_fewshot_is_passed_to_lm_eval(model, tok, manager):
    res = evaluate_lm_eval(model, tok, "harness_mc", manager, limit=1, num_fewshot=2, max_length=128)
    assert res.settings["num_fewshot"] == 2 and res.values["samples"] == 1


def test_dropped_cache_fails_before_any_request(tok, manager, drop_cache):
    from harness.metrics.decode_check import CacheMismatchError

    config = preset_config("tiny-hybrid")
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    broken = drop_cache(HybridForCausalLM(config).eval())
    with pytest.raises(CacheMismatchError, match="cache is not reaching HybridForCausalLM"):
        evaluate_lm_eval(broken, tok, "harness_gen", manager, max_length=128)


def test_missing_lm_eval_names_the_extra(monkeypatch, model, tok, manager):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(UserError, match=r"pip install 'harness\[lm-eval\]'"):
        evaluate_lm_eval(model, tok, "harness_mc", manager)


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / name).read_text().splitlines()]


# ----------------------------------------------------------------------------- suite and report

SUITE = f"""name: x
finetune: {{context: 512}}
metrics:
  lm_eval: {{tasks: [harness_mc, harness_gen], limit: 4, include_path: {TASKS}}}
"""


def test_suite_plans_one_cell_per_stage_and_task(tmp_path):
    (tmp_path / "s.yaml").write_text(SUITE)
    s = load_suite(tmp_path / "s.yaml")
    c = s.metrics.lm_eval
    assert (c.max_length, c.batch_size, c.num_fewshot, c.eval_attention) == (512, 1, None, "full")
    cells = [cell for job in plan(s, "data") for cell in job.cells if cell["metric"] == "lm_eval"]
    assert [cell["id"] for cell in cells] == [f"tiny-hybrid/seed0/{v}/lm_eval/{t}" for v in ("pretrained", "lora/full")
                                              for t in ("harness_mc", "harness_gen")]
    assert local_tasks_fingerprint(str(TASKS)) == local_tasks_fingerprint(str(TASKS))


def test_lm_eval_cells_hash_what_decides_their_numbers():
    from types import SimpleNamespace

    from harness.metrics.plugins.lm_eval import LmEval, LmEvalConfig

    def hashed(**fields):
        ((_, h),) = LmEval().cells(LmEvalConfig(tasks=["t"], **fields), SimpleNamespace(stage="pretrained"), None)
        return h

    assert hashed() == {"metric": {"limit": None, "num_fewshot": None, "batch_size": 1, "max_length": None,
                                   "include_path": None}, "local_tasks": None}
    for change in ({"limit": 3}, {"num_fewshot": 0}, {"batch_size": 2}, {"max_length": 64}):
        assert hashed(**change) != hashed(), change


def test_local_tasks_fingerprint_follows_data_files_outside_the_include_path(tmp_path, monkeypatch):
    # the README's offline recipe: dataset_path json, data_files an absolute path outside include_path
    tasks, data = tmp_path / "tasks", tmp_path / "data"
    tasks.mkdir(), data.mkdir()
    (data / "mc.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n')
    (data / "part-1.jsonl").write_text("{}\n")
    (tasks / "mine.yaml").write_text(f"task: mine\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: "
                                     f"{data / 'mc.jsonl'}, train: [data/part-*.jsonl]}}}}\n"
                                     "process_docs: !function utils.process\n")
    monkeypatch.chdir(tmp_path)  # relative data_files are read from the working directory
    before = local_tasks_fingerprint(str(tasks))
    assert local_tasks_fingerprint(str(tasks)) == before
    (data / "mc.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": 1}\n')
    changed = local_tasks_fingerprint(str(tasks))
    assert changed != before
    (data / "part-2.jsonl").write_text("{}\n")  # the glob now matches one more file
    assert local_tasks_fingerprint(str(tasks)) != changed


@pytest.mark.parametrize("field, match", [
    ("limits: 4", r"line 4: metrics.lm_eval.limits: unknown field \(did you mean 'limit'\?\)"),
    ("limit: 0", r"metrics.lm_eval.limit: Input should be greater than or equal to 1"),
    ("include_path: no/such/dir", r"metrics.lm_eval.include_path: no directory 'no/such/dir'"),
    ("eval_attention: sliding", r"metrics.lm_eval.eval_attention"),
])
def test_bad_lm_eval_field_is_named(tmp_path, field, match):
    (tmp_path / "s.yaml").write_text(f"name: x\nmetrics:\n  lm_eval:\n    {field}\n    tasks: [harness_mc]\n")
    with pytest.raises(UserError, match=match):
        load_suite(tmp_path / "s.yaml")


def test_report_tabulates_tasks_by_variant():
    from harness import results

    def rec(stage, method, task, values, status="ok"):
        return results.Record(suite="s", metric="lm_eval", status=status, stage=stage, method=method,
                              cell=f"m/seed0/{method}/lm_eval/{task}", model={"preset": "m"}, values=values,
                              settings={"task": task, "num_fewshot": 0})

    section = lm_eval_section([
        rec("pretrained", "none", "harness_mc", {"acc": 0.5, "acc_stderr": 0.2, "samples": 6}),
        rec("finetuned", "lora", "harness_mc", {"acc": 0.75, "acc_stderr": 0.1, "samples": 6}),
        rec("finetuned", "lora", "harness_gen", {}, status="error"),
        rec("pretrained", "none", "group", {"samples": 6, "subtasks": {"harness_mc": {"acc": 0.5}}}),
    ])
    (tbl,) = [b for b in section["blocks"] if b["type"] == "table"]
    rows = {tuple(c["text"] for c in row[:2]): [c["text"] for c in row[2:]] for row in tbl["rows"]}
    assert rows[("harness_mc", "acc")] == ["0.500 ± 0.200", "0.750 ± 0.100"]
    assert rows[("harness_gen", "–")] == ["–", "ERROR"]
    assert rows[("group", "–")] == ["–", "–"]  # a group without an aggregate: its subtasks' rows follow
    assert rows[("group › harness_mc", "acc")] == ["0.500", "–"]
    assert lm_eval_section([]) is None



def test_suite_cells_run_through_the_job_into_the_report(tmp_path, monkeypatch):
    """The variant job of harness.job (run in-process here; the runner runs it in a child) records each task."""
    from harness import results
    from harness.job import run_job
    from harness.report.html import render_html

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "s.yaml").write_text(f"""name: x
methods: []
pretrain: {{context: 64, steps: 1, batch_size: 1, warmup_steps: 0}}
metrics:
  lm_eval: {{tasks: [harness_mc, harness_gen], batch_size: 2, include_path: {TASKS}}}
""")
    (job,) = [j for j in plan(load_suite(tmp_path / "s.yaml"), "data") if j.kind == "variant"]
    run_job({"suite": str(tmp_path / "s.yaml"), "out": str(tmp_path), **job.spec, "kind": job.kind,
             "cells": job.cells})
    recs = {r.settings["task"]: r for r in results.load(tmp_path)}
    assert [r.status for r in recs.values()] == ["ok", "ok"], [r.error for r in recs.values()]
    assert recs["harness_mc"].values["samples"] == ROWS["harness_mc"] and recs["harness_mc"].stage == "pretrained"
    assert recs["harness_mc"].settings["max_length"] == 2048 and recs["harness_mc"].kernel == "full via sdpa"
    assert (tmp_path / recs["harness_gen"].settings["samples_file"]).read_text().count("\n") == ROWS["harness_gen"]
    html = render_html(list(recs.values()), title="t")
    assert 'id="lm-eval"' in html and "harness_gen" in html


def test_report_means_over_seeds_arrows_and_subtasks_after_their_group():
    from harness import results

    def rec(seed, values, task="grp"):
        return results.Record(suite="s", metric="lm_eval", stage="finetuned", method="lora", variant={"seed": seed},
                              cell=f"m/seed{seed}/lora/lm_eval/{task}", model={"preset": "m"}, values=values,
                              settings={"task": task, "num_fewshot": 0, "higher_is_better": {"acc": True,
                                                                                             "ppl": False}})

    section = lm_eval_section([
        rec(0, {"acc": 0.5, "acc_stderr": 0.1, "ppl": 3.0, "f1": 0.9, "f1_stderr": 0.05, "samples": 6,
                "subtasks": {"sub": {"acc": 0.25}}}),
        rec(1, {"acc": 0.75, "acc_stderr": 0.1, "ppl": 5.0, "samples": 6, "subtasks": {"sub": {"acc": 0.5}}}),
        rec(2, {"acc": 1.0, "samples": 6, "subtasks": {"sub": {"acc": 0.75}}}),
    ])
    (tbl,) = [b for b in section["blocks"] if b["type"] == "table"]
    rows = [tuple(c["text"] for c in row) for row in tbl["rows"]]
    # acc: (0.5 + 0.75 + 1) / 3; ppl: (3 + 5) / 2 over the seeds that have it; f1 from seed 0 alone, with its
    # stderr; no "_stderr" row; the subtask after its group
    assert rows == [("grp", "acc \u2191", "0.750"), ("", "ppl \u2193", "4.000"), ("", "f1", "0.900 \u00b1 0.050"),
                    ("grp \u203a sub", "acc \u2191", "0.500")]


def test_report_shows_a_metric_measured_nan_as_failed_not_missing():
    """A NaN showed "–", which reads "not measured", and a metric NaN for every variant lost its row."""
    from harness import results

    def rec(stage, method, seed, values):
        return results.Record(suite="s", metric="lm_eval", stage=stage, method=method, variant={"seed": seed},
                              cell=f"m/seed{seed}/{method}/lm_eval/t", model={"preset": "m"}, values=values,
                              settings={"task": "t", "num_fewshot": 0})

    nan = float("nan")
    section = lm_eval_section([
        rec("pretrained", "none", 0, {"acc": nan, "f1": nan, "samples": 6}),
        rec("finetuned", "lora", 0, {"acc": 0.5, "f1": nan, "samples": 6}),
        rec("finetuned", "lora", 1, {"acc": nan, "f1": nan, "samples": 6}),
    ])
    (tbl,) = [b for b in section["blocks"] if b["type"] == "table"]
    rows = {tuple(c["text"] for c in row[:2]): row[2:] for row in tbl["rows"]}
    assert [c["text"] for c in rows[("t", "acc")]] == ["ERROR", "0.500"]
    assert rows[("t", "acc")][0]["title"] == "it measured NaN"
    assert rows[("t", "acc")][1]["note"] == "1 of 2 seeds (1 ERROR)"  # the mean of the seed that measured it
    assert [c["text"] for c in rows[("", "f1")]] == ["ERROR", "ERROR"]


def test_values_are_named_by_metric_and_filter_and_a_missing_stderr_is_none():
    from harness.metrics.lm_eval import _dataset, _values

    entry = {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "exact_match,strict-match": 0.25,
             "exact_match_stderr,strict-match": 0.1}
    assert _values(entry) == {"acc": 0.5, "acc_stderr": None, "exact_match/strict-match": 0.25,
                              "exact_match/strict-match_stderr": 0.1}
    # the split scored: the test split where the task has one, else the validation split
    assert _dataset("t", {"dataset_path": "p", "dataset_name": "n", "test_split": "test",
                          "validation_split": "validation"}) == {"name": "p/n", "split": "test"}
    assert _dataset("t", {"dataset_path": "p", "validation_split": "validation"}) == {"name": "p",
                                                                                      "split": "validation"}


def test_local_tasks_fingerprint_follows_a_data_dir(tmp_path):
    tasks, data = tmp_path / "tasks", tmp_path / "data"
    tasks.mkdir(), data.mkdir()
    (data / "test.jsonl").write_text("{}\n")
    (tasks / "mine.yaml").write_text(f"task: mine\ndataset_path: json\ndataset_kwargs: {{data_dir: {data}}}\n")
    before = local_tasks_fingerprint(str(tasks))
    (data / "test.jsonl").write_text('{"a": 1}\n')
    assert local_tasks_fingerprint(str(tasks)) != before


def _report_rows(records) -> list[tuple[str, ...]]:
    (tbl,) = [b for b in lm_eval_section(records)["blocks"] if b["type"] == "table"]
    return [tuple(c["text"] for c in row) for row in tbl["rows"]]


def _lm_eval_record(seed, values, status="ok", task="t", higher=None):
    from harness import results

    return results.Record(suite="s", metric="lm_eval", status=status, stage="finetuned", method="lora",
                          variant={"seed": seed}, cell=f"m/seed{seed}/lora/lm_eval/{task}", model={"preset": "m"},
                          values=values, settings={"task": task, "num_fewshot": 0, "higher_is_better": higher or {}})


def test_a_metric_only_one_seed_has_shows_that_seeds_stderr():
    rows = _report_rows([_lm_eval_record(0, {"acc": 0.5, "f1_stderr": 0.3, "samples": 6}),
                         _lm_eval_record(1, {"acc": 0.75, "f1": 0.9, "f1_stderr": 0.05, "samples": 6})])
    assert rows[1][1:] == ("f1", "0.900 \u00b1 0.050")


def test_a_seed_that_failed_marks_the_value_and_a_filtered_metric_has_its_arrow():
    records = [_lm_eval_record(0, {"exact_match/strict-match": 0.5, "samples": 6}, higher={"exact_match": True}),
               _lm_eval_record(1, {}, status="oom")]
    (tbl,) = [b for b in lm_eval_section(records)["blocks"] if b["type"] == "table"]
    (row,) = tbl["rows"]
    assert row[1]["text"] == "exact_match/strict-match \u2191"
    assert row[2]["text"] == "0.500" and row[2]["note"] == "1 of 2 seeds (1 OOM)" and "partial" in row[2]["cls"]


def test_lm_eval_prints_its_results_table_with_headers():
    """The README runs lm-eval's own command on exports, which ends with this table. pytablewriter before 1.0 (what
    a resolver takes against python-dateutil 4 without the extra's floor) named the columns A, B, C..."""
    from lm_eval.utils import make_table

    table = make_table({"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1}},
                        "versions": {"t": 1}, "n-shot": {"t": 0}, "higher_is_better": {"t": {"acc": True}}})
    assert table.splitlines()[0].replace(" ", "").startswith("|Tasks|Version|Filter|n-shot|Metric|")
