"""One job, run in its own process by the runner: a pretraining, the cells of one model variant (built or loaded
once), or the cells of one attention backend. Each cell is measured by its metric's plugin
(harness.metrics.base), given a `Context`.

`python -m harness.job SPEC.json`. Each cell appends its record as soon as it is measured; a
failing cell is recorded ("oom" or "error") and the job goes on with the next one. Hard
crashes and timeouts are recorded by the parent (harness.runner).

With `run.nproc` > 1 a variant's job builds its fine-tune (on nproc processes, harness.finetune.distributed)
and then measures its cells on nproc ranks (torchrun, `-m harness.job` again): each rank loads the variant, a
metric that spreads its work (`Metric.ranks`: perplexity's windows, RULER's samples) measures its share on each
and gathers the rest, any other is measured by rank 0, and rank 0 alone writes records. Each rank takes part in
exactly one collective per cell (`Context.gather`, or `Context.settle` for it), so a cell that fails on one rank is
recorded as failed and the ranks go on to the next cell together.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from harness import results
from harness.attention import recording
from harness.errors import UserError
from harness.executors import REFUSED
from harness.finetune import distributed
from harness.metrics.base import Measurement, Ranks, get
from harness.suite import Backend, Suite, load_suite


def run_job(spec: dict) -> None:
    try:
        suite = load_suite(spec["suite"], spec.get("run"), spec.get("suite_sha256"))
    except UserError as e:
        if "attempt" in spec:
            (Path(spec["out"]) / REFUSED.format(spec["attempt"])).write_text(str(e))
        raise
    if spec.get("kind") == "variant" and suite.run.nproc > 1 and not spec.get("ranked"):
        _on_ranks(suite, spec)
        return
    # a cell may keep the other ranks waiting as long as the runner lets it run without a record
    world = distributed.join(suite.run.strategy, suite.run.timeout + 60) if spec.get("ranked") else distributed.SINGLE
    try:
        _measure_cells(suite, spec, world)
    finally:
        if world.size > 1:
            torch.distributed.destroy_process_group()


def _on_ranks(suite: Suite, spec: dict) -> None:
    """The variant's fine-tune built (if it is not cached), then its cells measured on `run.nproc` ranks."""
    ctx = Context(suite, spec)
    try:
        ctx.prepare()
        code = distributed.torchrun("harness.job", {**spec, "ranked": True}, suite.run.nproc)
    except Exception as e:  # noqa: BLE001 - the variant cannot be built, or its ranks not started (too few
        _print_failure(e)  # devices on this node): each of its cells is a failed record, not one per restart
        for cell in spec["cells"]:
            results.append(Path(spec["out"]), _failed(results.cell_record(suite.name, cell, env=results.environment()),
                                                      e))
        return
    if code != 0:
        raise RuntimeError(f"the {suite.run.nproc}-process evaluation (torchrun) exited with code {code}; its ranks' "
                           "output is above")


def _measure_cells(suite: Suite, spec: dict, world: distributed.World) -> None:
    out, env = Path(spec["out"]), results.environment()
    ctx = Context(suite, spec, world)
    for cell in spec["cells"]:
        rec = results.cell_record(suite.name, cell, env=env)
        t0, error = time.perf_counter(), None
        try:
            with recording() as kernels:
                if cell["metric"] == "pretrain":
                    rec = _pretrain(rec, ctx)
                else:
                    metric = get(cell["metric"])
                    if metric.ranks or world.main:
                        rec = _fill(rec, metric.measure(ctx, cell, getattr(suite.metrics, metric.name, None)))
                    if metric.ranks and world.size > 1:
                        rec = replace(rec, settings={**rec.settings, "ranks": world.size})
            rec = replace(rec, kernel=rec.kernel or ", ".join(sorted(kernels)))
        except Exception as e:  # noqa: BLE001 - one cell's failure is a recorded result, not the end of the job
            _print_failure(e)
            rec, error = _failed(rec, e), e
        ctx.settle(error)
        if not world.main:
            continue
        rec = replace(rec, seconds=rec.seconds or round(time.perf_counter() - t0, 2))
        results.append(out, rec)
        shown = {k: v for k, v in rec.values.items() if k in ("perplexity", "accuracy", "acc", "time_ms",
                                                               "tokens_per_s")}
        print(f"  {cell['id']}: {rec.status}{f' {json.dumps(shown)}' if shown else ''} ({rec.seconds:.1f} s)",
              flush=True)
        for w in rec.warnings:
            print(f"  warning: {cell['id']}: {w}", flush=True)


def _print_failure(e: Exception) -> None:
    """A traceback for a bug; one line for what the user can fix (UserError); nothing for an OOM (a result)."""
    if isinstance(e, UserError):
        print(f"error: {e}", file=sys.stderr, flush=True)
    elif not isinstance(e, torch.OutOfMemoryError):
        traceback.print_exc()


def _failed(rec: results.Record, e: Exception) -> results.Record:
    if isinstance(e, torch.OutOfMemoryError):
        return replace(rec, status="oom", error=str(e).splitlines()[0])
    return replace(rec, status="error", error=f"{type(e).__name__}: {e}")


def _fill(rec: results.Record, m: Measurement) -> results.Record:
    """A measurement into the cell's record: what the cell said of itself (its task and evaluation attention in
    `settings`, its model preset) stays unless the measurement says more."""
    return replace(rec, values=m.values, units=m.units, dataset=m.dataset, settings={**rec.settings, **m.settings},
                   model=m.model or rec.model, kernel=m.kernel, seconds=m.seconds or 0.0, warnings=m.warnings)


def _pretrain(rec: results.Record, ctx: Context) -> results.Record:
    from harness.artefacts import pretrained

    _, info = pretrained(ctx.suite, ctx.spec["model"], ctx.seed)
    values = info.pop("train")
    return replace(rec, model=info, values=values, units={"tokens_per_s": "tokens/s", "peak_memory_gib": "GiB"},
                   settings=ctx.suite.pretrain.model_dump())


class Context:
    """What a metric's `measure` gets from the job: the suite, the variant's model (built or loaded once per job),
    its fine-tuning backend, the evaluation data, the ranks it is measured on, and a place for per-sample
    outputs."""

    def __init__(self, suite: Suite, spec: dict, world: distributed.World = distributed.SINGLE):
        self.suite, self.spec, self.seed, self.world = suite, spec, spec.get("seed", 0), world
        self.backend = Backend(**spec["backend"]) if spec.get("backend") else None
        self.state: dict = {}  # per job: whatever a metric wants to build once (lm-eval's task index, say)
        self.ranks = Ranks(world.rank, world.size, self.gather)
        self._gathered = False  # whether this rank has taken part in the current cell's collective

    def prepare(self) -> None:
        """Build the variant's fine-tune where it is not cached (on `run.nproc` processes), loading nothing."""
        from harness.artefacts import ensure_adapter

        if self.backend is not None:
            s = self.spec
            ensure_adapter(self.suite, self.suite.model(s["model"]), s["seed"], s["method"], self.backend,
                           self.documents("train"), self._launch())

    def model(self):
        """(model, info): the base (a pretrained preset or a checkpoint), or its fine-tune with this job's method
        and backend. Built once per job: if building fails, every cell that asks gets that error (a fine-tune that
        diverged is not trained again for each of its cells)."""
        from harness.artefacts import base, finetuned

        if "model" not in self.state:
            s, entry = self.spec, self.suite.model(self.spec["model"])
            try:
                self.state["model"] = (base(self.suite, entry, s["seed"]) if self.backend is None else
                                       finetuned(self.suite, entry, s["seed"], s["method"], self.backend,
                                                 self.documents("train"), self._launch()))
            except Exception as e:
                self.state["model"] = e
                raise
        if isinstance(self.state["model"], Exception):
            raise self.state["model"]
        return self.state["model"]

    def _launch(self):
        """How a fine-tune not in the cache is built: here (None), on `run.nproc` processes, or (on the ranks
        that evaluate it, which the job starts once it is built) not at all."""
        s, run = self.spec, self.suite.run
        if run.nproc == 1:
            return None
        if self.world.size > 1:
            return _built_before_the_ranks
        return lambda: distributed.launch(s, run.nproc, run.strategy)

    def gather(self, part) -> list:
        """Every rank's `part` of the cell being measured, in rank order (`ctx.ranks.gather`). An error on any rank
        raises here on every rank, a torch.OutOfMemoryError where it was one."""
        if self.world.size == 1:
            return [part]
        if self._gathered:
            raise RuntimeError("Context.gather: called twice for one cell; each rank gathers once per cell")
        self._gathered = True
        parts = self._collective(("part", part))
        for rank, (kind, value) in enumerate(parts):
            if kind == "error":
                oom, message = value
                raise (torch.OutOfMemoryError if oom else RuntimeError)(f"rank {rank}: {message}")
            if kind != "part":
                raise RuntimeError(f"rank {rank} ended the cell without gathering its part")
        return [value for _, value in parts]

    def settle(self, error: Exception | None) -> None:
        """End the current cell: a rank that has not gathered takes part in the cell's collective now, with its
        error if it failed (so that ranks waiting in `gather` raise it) or with nothing."""
        if self.world.size > 1 and not self._gathered:
            failed = (isinstance(error, torch.OutOfMemoryError), f"{type(error).__name__}: {error}")
            self._collective(("done", None) if error is None else ("error", failed))
        self._gathered = False

    def _collective(self, payload) -> list:
        """The ranks' payloads. Where the collective itself fails, a rank has ended (died, killed): this one ends
        too, recording nothing more, so that the runner records the cell and starts the job again for the rest."""
        try:
            return self.world.gather(payload)
        except Exception as e:  # noqa: BLE001 - gloo and nccl raise RuntimeError or their own errors
            raise SystemExit(f"rank {self.world.rank}: the ranks' collective failed ({type(e).__name__}: {e}); "
                             "another rank has ended, so this one ends too") from e

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
        from harness.data.tokenizer import text_bytes, tokenizer_fingerprint
        from harness.data.tokens import as_long, token_stream

        if ("eval_stream", max_tokens) not in self.state:
            docs, tok = self.documents("eval"), self.tokenizer()
            stream = as_long(token_stream(tok, docs, max_tokens))
            self.state["eval_stream", max_tokens] = stream, {
                **docs.dataset(), "tokens": int(stream.numel()), "bytes": text_bytes(tok, stream),
                "tokenizer": tokenizer_fingerprint(tok)}
        return self.state["eval_stream", max_tokens]

    def write_samples(self, cell: dict, samples: list[dict]) -> str:
        """Write a cell's per-sample records to OUT/samples/HASH.jsonl; return the path relative to OUT."""
        path = Path(self.spec["out"]) / "samples" / f"{cell['hash']}.jsonl"
        if self.world.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(s, default=str) + "\n" for s in samples))
        return str(path.relative_to(self.spec["out"]))


def _built_before_the_ranks() -> None:
    raise RuntimeError("the fine-tune is not in the cache: the job builds it before its ranks start (was the cache "
                       "entry removed meanwhile?)")


def main(spec_file: str) -> None:
    distributed.exit_with_parent()
    try:
        run_job(json.loads(Path(spec_file).read_text()))
    except UserError as e:
        _print_failure(e)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1])
