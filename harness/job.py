"""One job, run in its own process by the runner: build or load one model variant and measure its cells.

`python -m harness.job SPEC.json`. Each cell appends its record as soon as it is measured; a
failing cell is recorded ("oom" or "error") and the job goes on with the next one. Hard
crashes and timeouts are recorded by the parent (harness.runner).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from harness import provenance, results
from harness.attention import recording
from harness.suite import Backend, Suite, load_suite


def run_job(spec: dict) -> None:
    suite = load_suite(spec["suite"])
    out, env = Path(spec["out"]), results.environment()
    backend = Backend(**spec["backend"]) if spec.get("backend") else None
    measure = {"pretrain": _pretrain, "variant": _variant, "efficiency": _efficiency}[spec["kind"]]
    for cell, rec, fn in measure(suite, spec, backend):
        rec.cell, rec.suite, rec.env, rec.config_hash = cell["id"], suite.name, env, cell["hash"]
        rec.variant, rec.code = cell["variant"], provenance.code(cell["metric"])
        t0 = time.perf_counter()
        try:
            with recording() as kernels:
                fn(rec)
            rec.kernel = rec.kernel or ", ".join(sorted(kernels))
        except torch.OutOfMemoryError as e:
            rec.status, rec.error = "oom", str(e).splitlines()[0]
        except Exception as e:  # noqa: BLE001 - one cell's failure is a recorded result, not the end of the job
            traceback.print_exc()
            rec.status, rec.error = "error", f"{type(e).__name__}: {e}"
        rec.seconds = rec.seconds or round(time.perf_counter() - t0, 2)
        results.append(out, rec)
        shown = {k: v for k, v in rec.values.items() if k in ("perplexity", "accuracy", "acc", "time_ms",
                                                               "tokens_per_s")}
        print(f"  {cell['id']}: {rec.status} {json.dumps(shown)} ({rec.seconds:.1f} s)", flush=True)


def _pretrain(suite: Suite, spec: dict, _backend):
    from harness.artefacts import pretrained

    (cell,) = spec["cells"]
    rec = results.Record(suite="", cell="", metric="pretrain", stage="pretrained",
                         units={"tokens_per_s": "tokens/s", "peak_memory_gib": "GiB"})

    def fn(rec):
        _, info = pretrained(suite, spec["model"], spec["seed"])
        rec.model, rec.values = info, info.pop("train")
        rec.settings = suite.pretrain.model_dump()

    yield cell, rec, fn


def _variant(suite: Suite, spec: dict, backend: Backend | None):
    from harness.artefacts import finetuned, pretrained, use_attention

    state: dict = {}

    def model():
        if "model" not in state:
            if backend is None:
                state["model"], state["info"] = pretrained(suite, spec["model"], spec["seed"])
            else:
                state["model"], state["info"] = finetuned(suite, spec["model"], spec["seed"], spec["method"], backend)
        return state["model"], state["info"]

    common = {"stage": spec["stage"], "method": spec["method"], "backend": backend.label if backend else "full",
              "finetune_context": suite.finetune.context if backend else None}
    for cell in spec["cells"]:
        rec = results.Record(suite="", cell="", metric=cell["metric"], eval_context=cell.get("length"), **common)
        if cell["metric"] == "train":
            def fn(rec):
                _, info = model()
                rec.model, rec.values = info, dict(info["train"])
                rec.kernel = ", ".join(rec.values.pop("kernels", []))
                rec.units = {"tokens_per_s": "tokens/s", "peak_memory_gib": "GiB"}
                rec.settings = {**suite.finetune.model_dump(), "backend_options": backend.options}
                rec.seconds = round(rec.values.get("seconds", 0.0), 1)
        elif cell["metric"] == "perplexity":
            def fn(rec, cell=cell):
                from harness.metrics.perplexity import evaluate_perplexity

                m, info = model()
                p = suite.metrics.perplexity
                use_attention(m, backend, p.eval_attention)
                stream, dataset = _eval_stream(suite, spec, p.max_tokens)
                windows = max(1, p.tokens_per_length // cell["length"])
                res = evaluate_perplexity(m, stream, cell["length"], p.protocol, max_windows=windows, progress=True)
                rec.model, rec.dataset = info, dataset
                rec.values, rec.units = res.as_values(), res.units()
                rec.settings = {**res.as_settings(), "max_windows": windows, "eval_attention": p.eval_attention,
                                "pretrain_context": suite.pretrain.context, "seed": spec["seed"]}
        elif cell["metric"] == "lm_eval":
            def fn(rec, cell=cell):
                from harness.data import default_tokenizer
                from harness.metrics.lm_eval import evaluate_lm_eval, task_manager

                m, info = model()
                c = suite.metrics.lm_eval
                use_attention(m, backend, c.eval_attention)
                if "tasks" not in state:  # one task index per job: building it takes seconds
                    state["tasks"] = task_manager(c.tasks, c.include_path)
                res = evaluate_lm_eval(m, default_tokenizer(), cell["task"], state["tasks"], limit=c.limit,
                                       num_fewshot=c.num_fewshot, batch_size=c.batch_size, max_length=c.max_length)
                rec.model, rec.dataset, rec.values = info, res.dataset, res.values
                rec.settings = {**res.settings, "samples_file": _write_samples(spec, cell, res.samples),
                                "include_path": c.include_path, "eval_attention": c.eval_attention,
                                "pretrain_context": suite.pretrain.context}
        else:  # ruler
            def fn(rec, cell=cell):
                from harness.data import default_tokenizer
                from harness.metrics.ruler_eval import evaluate_ruler

                m, info = model()
                r = suite.metrics.ruler
                use_attention(m, backend, r.eval_attention)
                corpus, dataset = _eval_corpus(suite, spec)
                haystack = "\n\n".join(d.text for d in corpus.split(dataset["split"]))
                values, samples = evaluate_ruler(m, default_tokenizer(), cell["task"], cell["length"], r.samples,
                                                 spec["seed"], haystack, r.essay_file, r.qa_files.get(cell["task"]))
                rec.model, rec.dataset, rec.values = info, dataset, values
                rec.units = {"accuracy": "%"}
                rec.settings = {"task": cell["task"], "samples_file": _write_samples(spec, cell, samples),
                                "eval_attention": r.eval_attention, "pretrain_context": suite.pretrain.context}
        yield cell, rec, fn


def _efficiency(suite: Suite, spec: dict, backend: Backend):
    from harness.attention.bench import bench_attention

    e = suite.metrics.efficiency
    cuda = torch.cuda.is_available()
    for cell in spec["cells"]:
        rec = results.Record(suite="", cell="", metric="efficiency", backend=backend.label,
                             eval_context=cell["length"], units={"time_ms": "ms", "peak_memory_gib": "GiB"})

        def fn(rec, cell=cell):
            (row,) = bench_attention([(backend.name, backend.options)], [cell["length"]], heads=e.heads,
                                     head_dim=e.head_dim, batch=e.batch, repeats=e.repeats, warmup=e.warmup,
                                     dtype=torch.bfloat16 if cuda else torch.float32,
                                     device="cuda" if cuda else "cpu")
            rec.values = {"time_ms": row["time_ms"], "times_ms": row["times_ms"], "peak_memory_gib": row["peak_gib"]}
            rec.kernel = row["kernel"]
            rec.settings = {**e.model_dump(), "backend_options": backend.options, "pass": "forward+backward"}

        yield cell, rec, fn


def _write_samples(spec: dict, cell: dict, samples: list[dict]) -> str:
    """Write a cell's per-sample records to OUT/samples/HASH.jsonl; return the path relative to OUT."""
    path = Path(spec["out"]) / "samples" / f"{cell['hash']}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(s, default=str) + "\n" for s in samples))
    return str(path.relative_to(spec["out"]))


def _eval_corpus(suite: Suite, spec: dict):
    from harness.runner import eval_corpus

    corpus = eval_corpus(suite, spec.get("pg19"))
    split = "test" if corpus.embedded else suite.data.split
    return corpus, {"name": corpus.name, "split": split, "hash": corpus.fingerprint, "embedded": corpus.embedded}


def _eval_stream(suite: Suite, spec: dict, max_tokens: int):
    from harness.data import default_tokenizer, encode_corpus
    from harness.data.tokenizer import tokenizer_fingerprint

    corpus, dataset = _eval_corpus(suite, spec)
    tok = default_tokenizer()
    stream = encode_corpus(tok, corpus, dataset["split"], max_tokens=max_tokens)
    return stream, {**dataset, "tokens": int(stream.numel()), "tokenizer": tokenizer_fingerprint(tok)}


def _exit_with_parent() -> None:
    """End this process when the runner that started it dies (killed, not just interrupted)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    _exit_with_parent()
    run_job(json.loads(Path(sys.argv[1]).read_text()))
