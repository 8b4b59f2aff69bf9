"""`harness check gpu` (`nox -s gpu-check`): everything that needs a GPU, in one command on a CUDA machine that
has no network: installs nothing.

1. `pytest -m gpu` (the kernel-equivalence tests at bf16), where the checkout's tests are at hand;
2. suites/gpu-check.yaml: one attention layer of 32 heads x 128 (the targets' shape; bf16, forward + backward,
   CUDA events, allocator peaks) from 8K to 64K tokens, and a short fine-tune of the tiny model with every
   backend and method, evaluated on CUDA too;
3. OUT/gpu-check.json and OUT/gpu-check.md: what passed, the kernels that ran, and the attention targets at 32K
   (SE-Attn at least 3x faster than dense SDPA, within 1.3x of a sliding window with as many visible keys,
   peak memory at most 1.2x dense), each beside the kernels' own, stricter target (5x, 1.2x, 1.15x).

On a machine without CUDA it says what it would run and exits 2.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from harness.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "suites" / "gpu-check.yaml"
AT = 32768  # the length the targets are stated at
# (what, numerator backend, denominator backend, "min"|"max", the value compared, the check's bound, the kernels'
# bound: what the mask-free kernels aim at, stricter)
TARGETS = (
    ("SE-Attn speed-up over dense SDPA", "full", "se_attn", "min", "time_ms", 3.0, 5.0),
    ("SE-Attn time / sliding window (same visible keys)", "se_attn", "sliding_window", "max", "time_ms", 1.3, 1.2),
    ("SE-Attn peak memory / dense", "se_attn", "full", "max", "peak_memory_gib", 1.2, 1.15),
)


def plan() -> str:
    return "\n".join([
        f"  1. {sys.executable} -m pytest -m gpu   (in {ROOT / 'tests'})",
        f"  2. harness run {SUITE.relative_to(ROOT)}   (attention 8K-64K at 32 heads x 128 bf16; a short fine-tune "
        "per backend x method)",
        "  3. write OUT/gpu-check.json and OUT/gpu-check.md (targets at 32K: SE-Attn >= 3x dense, <= 1.3x sliding "
        "window, memory <= 1.2x dense; the kernels' own: 5x, 1.2x, 1.15x)"])


def check_gpu(out: Path) -> int:
    """Run the check into `out`; 0 when every test and cell passed (the targets are reported, not gating)."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"no CUDA device here (torch {torch.__version__}, CUDA build: "
                        f"{torch.version.cuda or 'no'}): `harness check gpu` is for a GPU machine. There it runs:\n"
                        + plan())
    if not SUITE.is_file():
        raise UserError(f"{SUITE} not found: run `harness check gpu` from a checkout of the harness")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "steps": {}}
    summary["steps"]["pytest -m gpu"] = _pytest(out)
    t0 = time.perf_counter()
    from harness import results
    from harness.runner import run_suite

    # one results directory per device: a rerun resumes on its own device and never takes another's timings
    suite_out = out / "suite" / re.sub(r"[^A-Za-z0-9._-]+", "-", summary["device"]).strip("-")
    outcome = run_suite(SUITE, suite_out)
    records = results.current(results.load(suite_out))
    summary["steps"]["suite gpu-check"] = {"ok": not outcome.failed, "seconds": round(time.perf_counter() - t0, 1),
                                           "cells": outcome.cells, "failed": outcome.failed,
                                           "report": str(outcome.report)}
    summary.update(summarise(records))
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "gpu-check.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0 if all(step["ok"] for step in summary["steps"].values()) else 1


def _pytest(out: Path) -> dict:
    if not (ROOT / "tests").is_dir():
        return {"ok": True, "skipped": "no tests directory (not a checkout)"}
    if importlib.util.find_spec("pytest") is None:
        return {"ok": False, "result": f"pytest is not installed for {sys.executable}: carry its wheel (see the "
                                       f"README's GPU check)"}
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests")], capture_output=True, text=True, cwd=ROOT)
    (out / "pytest-gpu.log").write_text(run.stdout + run.stderr)
    last = next((line for text in (run.stdout, run.stderr) for line in reversed(text.strip().splitlines())), "")
    return {"ok": run.returncode == 0, "seconds": round(time.perf_counter() - t0, 1), "result": last}


def summarise(records) -> dict:
    """The attention rows (backend, length: time, memory, kernel), the fine-tunes (method, backend: tokens/s,
    peak memory, kernels) and the targets at 32K from a gpu-check run's records."""
    attention = [{"backend": r.backend, "length": r.eval_context, "time_ms": r.values.get("time_ms"),
                  "peak_memory_gib": r.values.get("peak_memory_gib"), "kernel": r.kernel, "status": r.status}
                 for r in records if r.metric == "efficiency"]
    finetunes = [{"method": r.method, "backend": r.backend, "status": r.status,
                  "tokens_per_s": r.values.get("tokens_per_s"), "peak_memory_gib": r.values.get("peak_memory_gib"),
                  "kernels": r.values.get("kernels") or r.kernel, "error": r.error}
                 for r in records if r.metric == "train"]
    at = {row["backend"].split("(")[0]: row for row in attention if row["length"] == AT and row["status"] == "ok"}
    targets = []
    for name, num, den, kind, field, *bounds in TARGETS:
        value = (at[num][field] / at[den][field] if num in at and den in at and at[den][field] else None)
        met = [None if value is None else value >= b if kind == "min" else value <= b for b in bounds]
        shown = [f"{'>=' if kind == 'min' else '<='} {b}" for b in bounds]
        targets.append({"target": name, "value": None if value is None else round(value, 3),
                        "bound": shown[0], "met": met[0], "kernel_bound": shown[1], "kernel_met": met[1]})
    return {"attention": attention, "finetunes": finetunes, "targets": targets}


def markdown(summary: dict) -> str:
    mark = {True: "yes", False: "NO", None: "not measured"}
    lines = [f"# GPU check on {summary['device']} (torch {summary['torch']})", "", "| step | ok | detail |",
             "|---|---|---|"]
    lines += [f"| {name} | {mark[s['ok']]} | {s.get('result') or s.get('skipped') or s.get('failed') or ''} |"
              for name, s in summary["steps"].items()]
    lines += ["", f"## Attention targets at {AT} tokens", "",
              "| target | measured | bound | met | kernels' bound | met |", "|---|---|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {t['bound']} | {mark[t['met']]} | {t['kernel_bound']} | "
              f"{mark[t['kernel_met']]} |" for t in summary["targets"]]
    lines += ["", "## Attention, forward + backward", "", "| backend | length | ms | peak GiB | kernel |",
              "|---|---|---|---|---|"]
    lines += [f"| {a['backend']} | {a['length']} | {_num(a['time_ms'])} | {_num(a['peak_memory_gib'])} | "
              f"{a['kernel'] or a['status']} |" for a in summary["attention"]]
    lines += ["", "## Fine-tunes of the tiny model", "", "| method | backend | tokens/s | peak GiB | kernels |",
              "|---|---|---|---|---|"]
    lines += [f"| {f['method']} | {f['backend']} | {_num(f['tokens_per_s'])} | {_num(f['peak_memory_gib'])} | "
              f"{f['kernels'] if f['status'] == 'ok' else f['status'] + ': ' + str(f['error'])} |"
              for f in summary["finetunes"]]
    return "\n".join(lines) + "\n"


def _num(x) -> str:
    return "" if x is None else f"{x:,.3g}" if isinstance(x, float) else str(x)
