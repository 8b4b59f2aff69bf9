"""Synthetic records covering every report section, shaped as ``harness.job`` and ``harness.runner`` write them.

For tests and for looking at the report without running a suite:
``python -m harness.report.demo OUT_DIR`` writes ``OUT_DIR/index.html``.

Contents (two runs, "base" and "head", unless ``runs=1``): a pretraining record; two fine-tuned
variants (lora and hylora with se_attn at 2048) with their train records; perplexity at 512..4096
for the pretrained and both fine-tuned variants, plus the hylora variant evaluated with its
fine-tuning attention (``eval_attention: finetune``), with one parent-written OOM at 4096; RULER
for all eleven paper tasks at 1024 and 2048 where the pretrained model is at chance (0%) on
``niah_multikey_3`` and ``vt``; efficiency of two backends at 1024..8192 with an OOM at 8192;
a superseded (older, failed) record of a rerun cell.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace

from harness.cells import Cell, Variant
from harness.results import Record

MODEL = "tiny-hybrid"
SE = "se_attn(chunk_size=256/512,block_size=16,top_k=8)"
ENV = {"python": "3.11.9", "torch": "2.13.0+cpu", "transformers": "5.23.0", "device": "cpu", "cpu": "x86_64",
       "cpu_count": 2, "threads": 2, "git": "eca9ce4"}
DATASET = {"name": "kjv", "split": "test", "hash": "0123456789abcdef", "embedded": True}
PPL_CONTEXTS = (512, 1024, 2048, 4096)
RULER_LENGTHS = (1024, 2048)
EFF_LENGTHS = (1024, 2048, 4096, 8192)
AT_CHANCE = ("niah_multikey_3", "vt")
DEVIATION = "book text instead of Paul Graham essays"


def _hash(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _variants() -> list[Variant]:
    return [Variant(MODEL, 0), Variant(MODEL, 0, "lora", SE, 2048), Variant(MODEL, 0, "hylora", SE, 2048)]


def _failure(cell: Cell) -> Record:
    """A failure as the runner writes it when a job process is killed."""
    from harness.results import cell_record

    spec = {**cell.as_dict(), "hash": _hash(cell.id), "code": "demo"}
    error = "job process exited with code -9 (killed: likely out of memory)"
    return cell_record("demo", spec, status="oom", error=error)


def _ruler_accuracy(task_index: int, task: str, stage: str, method: str, length: int, shift: float) -> float:
    if stage == "pretrained":
        return 0.0 if task in AT_CHANCE else round(85.0 - 5 * task_index - 0.005 * length, 1)
    gain = 12.0 if method == "hylora" else 6.0
    return round(min(100.0, max(0.0, 70.0 - 5 * task_index - 0.005 * length + gain + shift)), 1)


def records(runs: int = 2, seed_run_shift: float = -8.0) -> list[Record]:
    """The records, each tagged with its ``run`` when ``runs`` > 1."""
    from harness.data.ruler.tasks import PAPER_TASKS

    out: list[Record] = []
    for ri in range(runs):
        run = ("base", "head", "third")[ri] if runs > 1 else None
        shift = seed_run_shift * ri
        recs: list[Record] = []
        model = {"preset": MODEL, "hash": "m0", "pretrain_context": 512, "corpus": "kjv"}
        recs.append(Record(
            suite="demo", cell=Cell("pretrain", Variant(MODEL, 0)).id, metric="pretrain", stage="pretrained",
            model=model, variant=Variant(MODEL, 0).as_dict(),
            values={"loss_curve": [[s, round(10.5 * 0.93 ** s + 4.2, 4)] for s in range(1, 201)], "tokens": 409600,
                    "seconds": 95.0, "peak_memory_gib": 1.12, "memory_kind": "process peak RSS",
                    "tokens_per_s": 4311.6},
            units={"tokens_per_s": "tokens/s", "peak_memory_gib": "GiB"}, kernel="full via sdpa",
            settings={"steps": 200, "context": 512}, env=ENV, seconds=95.0))
        for v in _variants():
            stage, method, ft = v.stage, v.method, v.finetune_context
            common = {"suite": "demo", "stage": stage, "method": method, "backend": v.backend, "finetune_context": ft,
                      "model": {**model, **({"adapter": _hash(v.id)} if ft else {})}, "env": ENV,
                      "variant": v.as_dict()}
            if stage == "finetuned":
                slope = 0.012 if method == "hylora" else 0.008
                recs.append(Record(
                    cell=Cell("train", v).id, metric="train", **common,
                    values={"loss_curve": [[s, round(4.6 - slope * s + 0.05 * ((s * 7) % 5) / 5, 4)]
                                           for s in range(1, 101)],
                            "tokens": 204800, "seconds": 160.0 + 20 * (method == "hylora"),
                            "peak_memory_gib": 1.8 if method == "hylora" else 1.6, "memory_kind": "process peak RSS",
                            "tokens_per_s": 1280.0 if method == "lora" else 1137.8,
                            "trainable_params": 12_544 if method == "lora" else 140_800, "total_params": 905_216,
                            "trainable_by_group": {"lora": 12_544} if method == "lora" else
                            {"lora": 12_544, "embeddings": 98_304, "norms": 1_536, "conv1d": 28_416}},
                    units={"tokens_per_s": "tokens/s", "peak_memory_gib": "GiB"}, kernel="se_attn via sdpa",
                    settings={"steps": 100, "context": 2048}, config_hash=_hash(v.id, "train"), seconds=170.0))
            for ev in ["full"] + (["finetune"] if method == "hylora" else []):
                for c in PPL_CONTEXTS:
                    cid = Cell("perplexity", v, c, eval_attention=ev).id
                    base = 30.0 + 0.004 * c if stage == "pretrained" else 29.0 - 0.001 * c - (method == "hylora")
                    ppl = round(base + (0.8 if ev == "finetune" else 0.0) + 0.15 * ri, 3)
                    settings = {"protocol": "longlora", "step": 256, "eval_attention": ev, "pretrain_context": 512,
                                "max_windows": max(1, 16384 // c), "seed": 0}
                    if method == "hylora" and ev == "full" and c == 4096:
                        # a failed attempt, superseded by its rerun in the base run; still failing in head
                        recs.append(_failure(Cell("perplexity", v, c, eval_attention=ev)))
                        if ri > 0:
                            continue
                    recs.append(Record(
                        cell=cid, metric="perplexity", eval_context=c, **common,
                        values={"perplexity": ppl, "nll": 3.4, "tokens_scored": 16384, "windows": max(1, 16384 // c),
                                "windows_total": 60},
                        units={"perplexity": "", "tokens_scored": "tokens"}, settings=settings, dataset=DATASET,
                        kernel="full via sdpa" if ev == "full" else "se_attn via sdpa", config_hash=_hash(cid, ev),
                        seconds=12.0))
            for ti, task in enumerate(PAPER_TASKS):
                for n in RULER_LENGTHS:
                    cid = Cell("ruler", v, n, task).id
                    acc = _ruler_accuracy(ti, task, stage, method, n, shift)
                    k = round(acc / 10)
                    per_sample = {_hash(task, n, i): float(i < k) for i in range(10)}
                    recs.append(Record(
                        cell=cid, metric="ruler", eval_context=n, **common,
                        values={"accuracy": acc, "samples": 10, "per_sample": per_sample,
                                "haystack_deviation": DEVIATION if "essay" in _haystack(task) else None},
                        units={"accuracy": "%"}, dataset=DATASET, kernel="full via sdpa",
                        settings={"task": task, "eval_attention": "full", "pretrain_context": 512,
                                  "samples_file": f"samples/{_hash(cid)}.jsonl"}, config_hash=_hash(cid),
                        seconds=4.0))
        for name, label, base_ms in (("full", "full", 3.0), ("se_attn", SE, 2.2)):
            for n in EFF_LENGTHS:
                cid = Cell("efficiency", length=n, backend=label).id
                if n == EFF_LENGTHS[-1] and name == "full":
                    recs.append(_failure(Cell("efficiency", length=n, backend=label)))
                    continue
                t = base_ms * (n / 1024) ** (2 if name == "full" else 1.2) * (1 + 0.05 * ri)
                recs.append(Record(
                    cell=cid, metric="efficiency", suite="demo", backend=label, eval_context=n,
                    values={"time_ms": round(t, 3), "times_ms": [round(t * f, 3) for f in (0.98, 1.0, 1.03)],
                            "peak_memory_gib": None},
                    units={"time_ms": "ms", "peak_memory_gib": "GiB"}, kernel=f"{name} via torch", env=ENV,
                    settings={"batch": 1, "heads": 4, "head_dim": 32, "repeats": 3, "warmup": 1,
                              "pass": "forward+backward"}, config_hash=_hash(cid), seconds=1.0))
        out += [replace(r, run=run) for r in recs] if run else recs
    return out


def _haystack(task: str) -> str:
    from harness.data.ruler.tasks import TASKS

    return str(TASKS[task].args.get("type_haystack", ""))


def main(argv: list[str] | None = None) -> None:
    from harness.report import render_report

    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else "reports/demo"
    path = render_report(records(), out, title="Demo report (synthetic records)",
                         notes=["Synthetic records from harness.report.demo: the numbers mean nothing."])
    print(f"report: {path}")


if __name__ == "__main__":
    main()
