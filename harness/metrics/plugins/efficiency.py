"""One attention layer, forward + backward, per backend and length (harness.attention.bench): time, memory, and
the query-key pairs of the backend's pattern with the speed-up over dense attention they allow."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from harness.cells import Cell
from harness.metrics.base import Measurement, Metric, Strict, distinct, register


class EfficiencyConfig(Strict):
    lengths: Annotated[list[Annotated[int, Field(ge=1)]], AfterValidator(distinct)] = Field(
        default_factory=lambda: [1024, 2048, 4096], min_length=1)
    heads: int = Field(4, ge=1)
    head_dim: int = Field(32, ge=1)
    batch: int = Field(1, ge=1)
    repeats: int = Field(5, ge=1)
    warmup: int = Field(1, ge=0)


@register
class Efficiency(Metric):
    name = "efficiency"
    config = EfficiencyConfig
    kind = "backend"
    modules = ("harness.attention", "harness.attention.bench")

    def cells(self, config: EfficiencyConfig, variant, plan):
        from harness.hardware import target

        # timings and peaks are the machine's: another machine (or Slurm request) measures them again
        hashed = {"metric": config.model_dump(exclude={"lengths"}), "hardware": target(plan.suite.run)}
        return [(Cell(self.name, length=n, backend=plan.backend.label), hashed) for n in config.lengths]

    def measure(self, ctx, cell: dict, config: EfficiencyConfig) -> Measurement:
        import torch

        from harness.attention.bench import bench_attention

        cuda, b = torch.cuda.is_available(), ctx.backend
        (row,) = bench_attention([(b.name, b.options)], [cell["length"]], heads=config.heads,
                                 head_dim=config.head_dim, batch=config.batch, repeats=config.repeats,
                                 warmup=config.warmup, dtype=torch.bfloat16 if cuda else torch.float32,
                                 device="cuda" if cuda else "cpu")
        return Measurement({"time_ms": row["time_ms"], "times_ms": row["times_ms"], "peak_memory_gib": row["peak_gib"],
                            "pairs": row["pairs"], "ideal_speedup": row["ideal_speedup"]},
                           {"time_ms": "ms", "peak_memory_gib": "GiB"},
                           {**config.model_dump(), "backend_options": b.options, "pass": "forward+backward"},
                           kernel="")  # "": every kernel that ran (the job's recording), the merge's among them

    def section(self, records):
        from harness.report.efficiency import efficiency_section

        return efficiency_section(records)
