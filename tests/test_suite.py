import json
import re

import pytest

from harness.artefacts import pretrain_config
from harness.errors import UserError
from harness.suite import load_suite


def write(tmp_path, text):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


def test_defaults_fill_in(tmp_path):
    s = load_suite(write(tmp_path, "name: x\n"))
    assert s.methods == ["lora"] and s.metrics.perplexity.protocol == "longlora" and s.finetune.context == 2048
    assert [b.label for b in s.backends] == ["full"]


def test_backend_options_and_grid_expand_and_resolve(tmp_path):
    s = load_suite(write(tmp_path, """name: x
backends:
  - full
  - sliding_window: {window: 1024}
  - se_attn: {chunk_size: [256, 512], grid: {block_size: [16, 32], top_k: [4, 8]}}
"""))
    labels = [b.label for b in s.backends]
    assert labels[:2] == ["full", "sliding_window(window=1024)"]
    assert labels[2:] == [f"se_attn(chunk_size=256/512,block_size={b},top_k={k})" for b in (16, 32) for k in (4, 8)]
    assert s.backends[2].options["chunk_size"] == (256, 512) and s.backends[2].options["retrieval"] == "relevancy"


def test_ruler_all_means_the_papers_eleven(tmp_path):
    s = load_suite(write(tmp_path, "name: x\nmetrics: {ruler: {tasks: [all]}}\n"))
    assert len(s.metrics.ruler.tasks) == 11 and s.metrics.perplexity is None


def test_unknown_field_suggests_fix_with_line(tmp_path):
    with pytest.raises(UserError, match=r"s.yaml: line 3: finetune.stepz: unknown field \(did you mean 'steps'\?\)"):
        load_suite(write(tmp_path, "name: x\nfinetune:\n  stepz: 3\n"))


@pytest.mark.parametrize("text, match", [
    ("name: x\nmetrics: {perplexity: {protocol: sliding}}\n", "metrics.perplexity.protocol"),
    ("name: x\nfinetune: {steps: 0}\n", "finetune.steps"),
    ("name: [unclosed\n", "malformed YAML"),
    ("- a\n- b\n", "YAML mapping"),
    ("description: no name\n", "name: Field required"),
    ("name: x\nmodels: [tiny-hybrd]\n", "line 2: models: .*did you mean .tiny-hybrid."),
    ("name: x\nmethods: [hylorra]\n", "did you mean 'hylora'"),
    ("name: x\nbackends: [se_atn]\n", "(?i)did you mean 'se_attn'"),
    ("name: x\nbackends: [{sliding_window: {window: 0}}]\n", "window=0 is invalid"),
    ("name: x\nbackends: [{se_attn: {top_k: -1}}]\n", "top_k"),
    ("name: x\nbackends: [{se_attn: {chunk_size: 4096}}]\n", r"needs finetune.context >= 4096 \(it is 2048\)"),
    ("name: x\nmetrics: {ruler: {tasks: [niah_singel_1]}}\n", "niah_single_1"),
    ("name: x\nmetrics: {}\n", "nothing to measure"),
    ("name: .hidden\n", "name: '.hidden': a suite name names its results directory"),
    ("name: x\nfinetune: {lr: 0}\n", "finetune.lr: learning rates must be > 0"),
    ("name: x\npretrain: {recall: {0: 0.5, -5: 0.25}}\n",  # a check's message, with no "(got ...)" after it
     r"pretrain.recall: a recall schedule maps first steps .* 2000: 0.25}$"),
    ("name: x\nplugins: [1]\n", "plugins: a list of module names"),
    # one error at the field, not one per form the union allows ("finetune.lr.float: ...; finetune.lr.dict[...")
    ("name: x\nfinetune: {lr: abc}\n", r"s.yaml: line 2: finetune.lr: Input should be a valid number, unable to "
                                       r"parse string as a number \(got 'abc'\)$"),
    ("name: x\nfinetune: {lr: {full: abc}}\n", r"yaml: line 2: finetune.lr.full: Input should be a valid number.*'\)$"),
    ("name: x\npretrain: {recall: {0: 0.5, x: 1}}\n", r"yaml: line 2: pretrain.recall.x: the key: Input should be a "
                                                     r"valid integer.*\(got 'x'\)$"),
    ("name: x\nfinetune: {context: 255, recall: 0.5}\n", "finetune: recall: .*at least 256 tokens"),
    ("name: x\nbackends: [{full: {}, s2_attn: {}}]\n", "line 2: backends.0: a backend is a name or a one-key mapping"),
    ("name: x\nbackends: [{se_attn: {grid: {top_k: []}}}]\n", "line 2: backends.0.grid: .*non-empty list of values"),
    ("name: x\nrun: {checkpoint_every: 0}\n", "run.checkpoint_every: Input should be greater than or equal to 1"),
    ("name: x\nrun: {executor: slurm, nproc: 8, slurm: {gpus_per_node: 4}}\n",
     "run: nproc 8 runs 8 processes per job, one GPU each, but slurm.gpus_per_node 4 gives each job 4"),
])
def test_bad_input_names_the_field(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        load_suite(write(tmp_path, text))


@pytest.mark.parametrize("text", [
    "name: x\npretrain: {recall: {0: 0, 100: 1}}\n",  # the bounds of a share
    "name: x\npretrain: {steps: 100, average_last: 100}\n",  # every step's weights
    "name: x\nfinetune: {context: 256, recall: 0.5}\n",  # the shortest context with recall rows
    "name: x\nfinetune: {context: 128}\n",  # no recall rows, no room needed
    "name: x\nrun: {executor: slurm, nproc: 4, slurm: {gpus_per_node: 4}}\n",  # one GPU per process
    "name: x\nrun: {nproc: 4, slurm: {gpus_per_node: 2}}\n",  # slurm settings unused by a local run
    "name: x\nmethods: []\nbackends: [{se_attn: {chunk_size: 4096}}]\n",  # nothing fine-tunes at 2048
    "name: x\nbackends: [{sliding_window: null}]\n",  # a backend's defaults, written as a mapping
])
def test_boundary_values_are_accepted(tmp_path, text):
    load_suite(write(tmp_path, text))


def test_attention_timed_alone_is_not_held_to_the_fine_tuning_context(tmp_path):
    """An efficiency suite fine-tunes nothing: SE-Attn with chunks of 4096 was refused for finetune.context 2048."""
    suite = load_suite(write(tmp_path, "name: x\nbackends: [{se_attn: {chunk_size: [2048, 4096]}}]\n"
                                       "metrics: {efficiency: {lengths: [8192]}}\n"))
    assert suite.backends[0].options["chunk_size"] == (2048, 4096)


@pytest.mark.parametrize("text, warning", [
    ("name: x\npretrain: {steps: 10}\n", "line 2: pretrain.warmup_steps: 30 is more than pretrain.steps \\(10\\): the "
                                          "learning rate never reaches pretrain.lr \\(it ends at 33% of it\\)"),
    ("name: x\nfinetune:\n  steps: 5\n  warmup_steps: 20\n", "line 4: finetune.warmup_steps: 20 is more than "
                                                                "finetune.steps \\(5\\)"),
    ("name: x\nmethods: []\nbackends: [full, s2_attn]\n", "line 2: methods: no method, so nothing is fine-tuned and "
                                                          r"backends \(full, s2_attn\) are not used"),
    ("name: x\nmethods: [lora, hylora]\nbackends: []\n", "line 3: backends: no backend, so nothing is fine-tuned "
                                                         r"and methods \(lora, hylora\) are not run"),
    ("name: x\nbackends: [{sliding_window: {window: 2048}}]\n", r"line 2: backends: sliding_window\(window=2048\) "
                                                               "lets every token see all earlier ones at "
                                                               "finetune.context 2048"),
    ("name: x\nmethods: [lora]\nbackends: []\nfinetune: {steps: 5}\n", "line 3: backends: no backend"),  # nor warm-up
    ("name: x\nbackends: [{se_attn: {chunk_size: 256, block_size: 16, top_k: 112}}]\n",
     "se_attn.* lets every token see all earlier ones"),  # 112 blocks of 16 before the last chunk of 256
    ("name: x\nbackends: [{s2_attn: {group_ratio: 0.0001}}]\n", "lets each token see only itself at "
                                                                "finetune.context 2048"),
    ("name: x\nbackends: [full]\nfinetune:\n  lr: {default: 1e-4, s2_attn: 1e-5, full: 2e-4}\n",
     r"line 4: finetune.lr.s2_attn: no s2_attn backend in `backends` \(full\), so this learning rate is not used"),
])
def test_settings_that_measure_something_else_are_warned_about(tmp_path, text, warning):
    warnings = load_suite(write(tmp_path, text)).warnings
    assert len(warnings) == 1 and warnings[0].startswith(f"{tmp_path / 's.yaml'}: ")
    assert re.search(warning, warnings[0]), warnings[0]


@pytest.mark.parametrize("text", [
    "name: x\npretrain: {steps: 30}\nfinetune: {steps: 20}\n",  # warm-up ends on the last step
    "name: x\nmethods: []\n",  # the pretrained model alone, said so
    "name: x\nbackends: []\n",
    "name: x\nbackends: [{sliding_window: {window: 2047}}, {s2_attn: {group_ratio: 0.001}}]\n",  # groups of 3
    "name: x\nbackends: [{se_attn: {chunk_size: 256, block_size: 16, top_k: 111}}]\n",
    "name: x\nmodels: [{name: c, path: /ckpt}]\npretrain: {steps: 10}\n",  # a checkpoint is not pretrained
    "name: x\nbackends: [{s2_attn: {group_ratio: 0.5}}]\nfinetune: {lr: {s2_attn: 1e-5, default: 1e-4}}\n",
    "name: x\nmethods: []\nfinetune: {steps: 5}\n",  # nothing is fine-tuned
    "name: x\nbackends: [{sliding_window: {window: 8192}}]\nmetrics: {efficiency: {lengths: [1024]}}\n",
])
def test_settings_that_measure_what_they_say_are_not_warned_about(tmp_path, text):
    assert load_suite(write(tmp_path, text)).warnings == []


def test_booleans_stay_where_a_boolean_or_anything_is_due(tmp_path):
    s = load_suite(write(tmp_path, "name: x\npretrain: {compile: yes}\nrun: {slurm: {additional: {exclusive: on}}}\n"))
    assert s.pretrain.compile is True and s.run.slurm.additional == {"exclusive": True}


def test_a_boolean_is_refused_only_where_a_number_and_no_boolean_is_due():
    from pydantic import ValidationError

    from harness.metrics.base import Strict

    class Config(Strict):
        count: int = 0
        count_or_flag: int | bool = 0
        block: dict = {}

    assert Config(count_or_flag=True, block={"n": True}).count_or_flag is True
    with pytest.raises(ValidationError, match="a boolean where a number is due"):
        Config(count=True)


def test_shipped_suites_have_no_warnings():
    from pathlib import Path

    assert {str(p): load_suite(p).warnings for p in Path("suites").glob("*.yaml")} == \
        {str(p): [] for p in Path("suites").glob("*.yaml")}


def test_command_line_run_settings_are_checked_with_the_suites(tmp_path):
    with pytest.raises(UserError, match=r"^run settings from the command line: nproc 8 runs 8 processes per job"):
        load_suite(write(tmp_path, "name: x\n"), {"executor": "slurm", "nproc": 8, "slurm": {"gpus_per_node": 2}})
    with pytest.raises(UserError, match=r"^run settings from the command line: nproc: Input should be greater"):
        load_suite(write(tmp_path, "name: x\n"), {"nproc": 0})


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_suite(tmp_path / "nope.yaml")


def test_finetune_lr_per_backend(tmp_path):
    s = load_suite(write(tmp_path, "name: x\nfinetune: {lr: {default: 3.0e-3, s2_attn: 3.0e-4}}\n"))
    assert s.finetune.lr_for("se_attn") == 3e-3 and s.finetune.lr_for("s2_attn") == 3e-4
    assert load_suite(write(tmp_path, "name: x\nfinetune: {lr: 3.0e-3}\n")).finetune.lr_for("s2_attn") == 3e-3
    paper = load_suite(write(tmp_path, "name: x\n")).finetune
    assert paper.lr_for("s2_attn") == 2e-5 and paper.lr_for("full") == 2e-4  # the paper's appendix G


def test_recall_fields_enter_the_fine_tuning_recipe_only_with_recall_on():
    from harness.suite import Finetune

    assert "recall" not in Finetune().recipe("lora", "full")  # cells keep the hashes they had before recall
    assert Finetune(recall=0.5).recipe("lora", "full")["recall"] == 0.5


def test_qa_tasks_need_their_data_file(tmp_path):
    with pytest.raises(UserError, match=r"metrics.ruler: tasks: qa_1 needs its data.*set qa_files.qa_1 .*SQuAD 2.0"):
        load_suite(write(tmp_path, "name: x\nmetrics: {ruler: {tasks: [niah_single_1, qa_1]}}\n"))
    with pytest.raises(UserError, match=r"qa_files.qa_2: no file 'nowhere.json'"):
        load_suite(write(tmp_path, "name: x\nmetrics: {ruler: {tasks: [qa_2], qa_files: {qa_2: nowhere.json}}}\n"))
    with pytest.raises(UserError, match=r"qa_files: 'vt' is not a task that needs a data file"):
        load_suite(write(tmp_path, f"name: x\nmetrics: {{ruler: {{qa_files: {{vt: {tmp_path / 's.yaml'}}}}}}}\n"))
    squad = tmp_path / "squad.json"
    squad.write_text("{}")
    s = load_suite(write(tmp_path, f"name: x\nmetrics: {{ruler: {{tasks: [qa_1], qa_files: {{qa_1: {squad}}}}}}}\n"))
    assert s.metrics.ruler.qa_files == {"qa_1": str(squad)}


def test_eval_attention_both_measures_finetuned_cells_with_each(tmp_path):
    """Each fine-tune with full attention and with its own; a full-backend fine-tune once (they are one)."""
    from harness.plan import plan

    s = load_suite(write(tmp_path, """name: x
backends: [full, s2_attn]
metrics:
  perplexity: {contexts: [64], eval_attention: both}
  ruler: {tasks: [niah_single_1], lengths: [512]}
"""))
    ids = sorted(c["id"] for j in plan(s, "data") for c in j.cells if c["metric"] in ("perplexity", "ruler"))
    assert ids == ["tiny-hybrid/seed0/lora/full/ppl@64", "tiny-hybrid/seed0/lora/full/ruler/niah_single_1@512",
                   "tiny-hybrid/seed0/lora/s2_attn/eval-finetune/ppl@64", "tiny-hybrid/seed0/lora/s2_attn/ppl@64",
                   "tiny-hybrid/seed0/lora/s2_attn/ruler/niah_single_1@512", "tiny-hybrid/seed0/pretrained/ppl@64",
                   "tiny-hybrid/seed0/pretrained/ruler/niah_single_1@512"]


def test_switching_eval_attention_keeps_the_cells_it_had(tmp_path):
    """From full to both, the full-attention cells stay done (the setting was in every cell's hash, so all were
    measured again), and each cell keeps a hash of its own (RULER's samples file is named by it)."""
    from harness.plan import plan

    def hashes(ev):
        s = load_suite(write(tmp_path, f"""name: x
backends: [s2_attn]
metrics:
  perplexity: {{contexts: [64], eval_attention: {ev}}}
  ruler: {{tasks: [niah_single_1], lengths: [512], eval_attention: {ev}}}
  lm_eval: {{tasks: [lambada_openai], eval_attention: {ev}}}
"""))
        return {c["id"]: c["hash"] for j in plan(s, "data") for c in j.cells if c["metric"] != "train"}

    full, both, finetune = hashes("full"), hashes("both"), hashes("finetune")
    assert full.items() <= both.items() and len(both) == len(full) + 3
    assert finetune.items() <= both.items()
    assert len(set(both.values())) == len(both)


def test_ruler_cells_know_their_essay_file_by_content(tmp_path, isolated_cache):
    from harness.plan import plan

    essays = tmp_path / "essays.json"
    hashes = []
    for text in ("One essay. " * 100, "Another essay. " * 100, "One essay. " * 100):
        essays.write_text(json.dumps({"text": text}))
        s = load_suite(write(tmp_path, f"name: x\nmetrics: {{ruler: {{lengths: [512], essay_file: {essays}}}}}\n"))
        hashes.append(next(c["hash"] for j in plan(s, "data") for c in j.cells if c["metric"] == "ruler"))
    assert hashes[0] != hashes[1] and hashes[0] == hashes[2]


def test_fine_tuned_cells_know_the_process_count_and_strategy(tmp_path):
    from harness.plan import plan

    def hashes(run):
        s = load_suite(write(tmp_path, f"name: x\nrun: {run}\nmetrics: {{perplexity: {{contexts: [64]}}}}\n"))
        return {c["id"]: c["hash"] for j in plan(s, "data") for c in j.cells}

    one, ddp, fsdp = hashes("{nproc: 1}"), hashes("{nproc: 2}"), hashes("{nproc: 2, strategy: fsdp}")
    tuned = [c for c in one if "/lora/" in c]
    assert tuned and all(len({one[c], ddp[c], fsdp[c]}) == 3 for c in tuned)  # another global batch, reduction
    assert all(one[c] == ddp[c] == fsdp[c] for c in one if c not in tuned)  # the pretrained model's cells


def test_a_job_refuses_a_suite_file_changed_since_its_run_planned_it(tmp_path):
    path = write(tmp_path, "name: x\n")
    planned = load_suite(path, {"max_parallel": 2}).sha256  # the runner's, with command-line run settings
    assert planned and load_suite(path, planned=planned).sha256 == planned
    path.write_text("name: x\nseeds: [1]\n")
    with pytest.raises(UserError, match="changed since `harness run` planned this job"):
        load_suite(path, planned=planned)


def test_recall_rows_need_room(tmp_path):
    with pytest.raises(UserError, match="finetune: recall: .*at least 256 tokens"):
        load_suite(write(tmp_path, "name: x\nfinetune: {context: 128, recall: 0.5}\n"))


def test_pretrain_recall_is_a_share_or_a_schedule_from_step_0(tmp_path):
    s = load_suite(write(tmp_path, "name: x\npretrain: {recall: {0: 0.5, 2400: 0.25}}\n"))
    assert s.pretrain.recall == {0: 0.5, 2400: 0.25}
    with pytest.raises(UserError, match="pretrain.recall.*one of them 0"):
        load_suite(write(tmp_path, "name: x\npretrain: {recall: {100: 0.5}}\n"))
    with pytest.raises(UserError, match="pretrain.recall.*between 0 and 1"):
        load_suite(write(tmp_path, "name: x\npretrain: {recall: 1.5}\n"))


def test_pretrain_average_last_reaches_the_training_config(tmp_path):
    s = load_suite(write(tmp_path, "name: x\npretrain: {steps: 100, average_last: 40}\n"))
    assert pretrain_config(s, 0).average_last == 40
    with pytest.raises(UserError, match="pretrain.*average_last \\(200\\) is more than steps \\(100\\)"):
        load_suite(write(tmp_path, "name: x\npretrain: {steps: 100, average_last: 200}\n"))


def test_se_attn_needs_a_context_that_holds_its_largest_chunk(tmp_path):
    with pytest.raises(UserError, match=r"backends: se_attn\(chunk_size=1024/4096\) needs finetune.context >= "
                                        r"4096 \(it is 2048\)"):
        load_suite(write(tmp_path, "name: x\nbackends: [{se_attn: {chunk_size: [1024, 4096]}}]\n"))
    suite = load_suite(write(tmp_path, "name: x\nbackends: [{se_attn: {chunk_size: [1024, 2048]}}]\n"))
    assert suite.finetune.context == 2048 and suite.backends[0].options["chunk_size"] == (1024, 2048)


def test_an_error_found_after_loading_gets_the_line_of_the_field_it_names(tmp_path):
    s = load_suite(write(tmp_path, "name: x\nmodels:\n  - tiny-hybrid\n  - {name: m2h-2.7b, path: /ckpt}\n"
                                   "metrics:\n  ruler: {tasks: [vt], lengths: [256]}\n"))
    assert s.located("metrics.ruler.lengths (in x): too short") == "line 6: metrics.ruler.lengths (in x): too short"
    assert s.located("models.m2h-2.7b: no weights") == "line 4: models.m2h-2.7b: no weights"  # its entry's line
    assert s.located("models.tiny-hybrid: x") == "line 3: models.tiny-hybrid: x"
    assert s.located("models.other: x") == "line 2: models.other: x"
    assert s.located("RULER task 'vt': x") == "RULER task 'vt': x"  # no field named: as it was
