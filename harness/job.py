"""One job, run in its own process by the runner: a pretraining, the cells of one model variant (built or loaded
once), or the cells of one attention backend. Each cell is measured by its metric's plugin
(harness.metrics.base), given a `Context`.

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
from dataclasses import replace
from pathlib import Path

import torch

from harness import results
from harness.attention import recording
from harness.metrics.base import Measurement, get
from harness.suite import Backend, Suite, load_suite


def run_job(spec: dict) -> None:
    suite = load_suite(spec["suite"], spec.get("run"))
    out, env = Path(spec["out"]), results.environment()
    ctx = Context(suite, spec)
    for cell in spec["cells"]:
        rec = results.cell_record(suite.name, cell, env=env)
        t0 = time.perf_counter()
        try:
            with recording() as kernels:
                if cell["metric"] == "pretrain":
                    rec = _pretrain(rec, ctx)
                else:
                    metric = get(cell["metric"])
                    rec = _fill(rec, metric.measure(ctx, cell, getattr(suite.metrics, metric.name, None)))
            rec = replace(rec, kernel=rec.kernel or ", ".join(sorted(kernels)))
        except torch.OutOfMemoryError as e:
            rec = replace(rec, status="oom", error=str(e).splitlines()[0])
        except Exception as e:  # noqa: BLE001 - one cell's failure is a recorded result, not the end of the job
            traceback.print_exc()
            rec = replace(rec, status="error", error=f"{type(e).__name__}: {e}")
        rec = replace(rec, seconds=rec.seconds or round(time.perf_counter() - t0, 2))
        results.append(out, rec)
        shown = {k: v for k, v in rec.values.items() if k in ("perplexity", "accuracy", "acc", "time_ms",
                                                               "tokens_per_s")}
        print(f"  {cell['id']}: {rec.status} {json.dumps(shown)} ({rec.seconds:.1f} s)", flush=True)


def _fill(rec: results.Record, m: Measurement) -> results.Record:
    """A measurement into the cell's record: what the cell said of itself (its task and evaluation attention in
    `settings`, its model preset) stays unless the measurement says more."""
    return replace(rec, values=m.values, units=m.units, dataset=m.dataset, settings={**rec.settings, **m.settings},
                   model=m.model or rec.model, kernel=m.kernel, seconds=m.seconds or 0.0)


def _pretrain(rec: results.Record, ctx: Context) -> results.Record:
    from harness.artefacts import pretrained

    _, info = pretrained(ctx.suite, ctx.spec["model"], ctx.seed)
    values = info.pop("train")
    return replace(rec, model=info, values=values, units={"tokens_per_s": "tokens/s", "peak_memory_gib": "GiB"},
                   settings=ctx.suite.pretrain.model_dump())


class Context:
    """What a metric's `measure` gets from the job: the suite, the variant's model (built or loaded once per job),
    its fine-tuning backend, the evaluation data, and a place for per-sample outputs."""

    def __init__(self, suite: Suite, spec: dict):
        self.suite, self.spec, self.seed = suite, spec, spec.get("seed", 0)
        self.backend = Backend(**spec["backend"]) if spec.get("backend") else None
        self.state: dict = {}  # per job: whatever a metric wants to build once (lm-eval's task index, say)

    def model(self):
        """(model, info): the base (a pretrained preset or a checkpoint), or its fine-tune with this job's method
        and backend."""
        from harness.artefacts import base, finetuned
        from harness.finetune import distributed

        if "model" not in self.state:
            s, entry, run = self.spec, self.suite.model(self.spec["model"]), self.suite.run
            launch = None if run.nproc == 1 else lambda: distributed.launch(s, run.nproc, run.strategy)
            self.state["model"] = (base(self.suite, entry, s["seed"]) if self.backend is None else
                                   finetuned(self.suite, entry, s["seed"], s["method"], self.backend,
                                             self.documents("train"), launch))
        return self.state["model"]

    def tokenizer(self):
        """The model's tokenizer (harness.artefacts.tokenizer)."""
        from harness.artefacts import tokenizer

        if "tokenizer" not in self.state:
            self.state["tokenizer"] = tokenizer(self.suite.model(self.spec["model"]))
        return self.state["tokenizer"]

    @property
    def pretrain_context(self) -> int:
        """The model's pretraining context: the suite's pretraining recipe for presets, a checkpoint's own."""
        return self.model()[1].get("pretrain_context") or self.suite.pretrain.context

    def use_attention(self, eval_attention: str) -> str:
        """Evaluate with full attention, or ("finetune") with the fine-tuning backend (harness.artefacts)."""
        from harness.artefacts import use_attention

        return use_attention(self.model()[0], self.backend, eval_attention)

    def documents(self, role: str):
        """The documents of the suite's `role` ("train" or "eval") source (harness.data.sources)."""
        from harness.plan import documents

        if role not in self.state.setdefault("documents", {}):
            self.state["documents"][role] = documents(self.suite, role, self.spec.get("pg19"))
        return self.state["documents"][role]

    def eval_stream(self, max_tokens: int):
        """(token stream of the evaluation documents, dataset fields with its token count, the UTF-8 bytes of the
        text it decodes to (special tokens left out) and the tokenizer's fingerprint); once per job."""
        from harness.data.tokenizer import tokenizer_fingerprint
        from harness.data.tokens import as_long, token_stream

        if ("eval_stream", max_tokens) not in self.state:
            docs, tok = self.documents("eval"), self.tokenizer()
            stream = as_long(token_stream(tok, docs, max_tokens))
            text_bytes = len(tok.decode(stream.tolist(), skip_special_tokens=True).encode("utf-8"))
            self.state["eval_stream", max_tokens] = stream, {
                **docs.dataset(), "tokens": int(stream.numel()), "bytes": text_bytes,
                "tokenizer": tokenizer_fingerprint(tok)}
        return self.state["eval_stream", max_tokens]

    def write_samples(self, cell: dict, samples: list[dict]) -> str:
        """Write a cell's per-sample records to OUT/samples/HASH.jsonl; return the path relative to OUT."""
        path = Path(self.spec["out"]) / "samples" / f"{cell['hash']}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(s, default=str) + "\n" for s in samples))
        return str(path.relative_to(self.spec["out"]))


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
