"""The fine-tuning run of each fine-tuned variant: its loss curve, throughput, memory and trainable parameters."""

from __future__ import annotations

from harness.cells import Cell
from harness.metrics.base import Measurement, Metric, register


@register
class Train(Metric):
    name = "train"
    finetuned_only = True  # no config: every fine-tuned variant has one

    def cells(self, config, variant, plan):
        return [(Cell(self.name, variant), {})]

    def measure(self, ctx, cell: dict, config) -> Measurement:
        _, info = ctx.model()
        values = dict(info["train"])
        kernels = values.pop("kernels", [])
        # the LR it trained at: the suite's `lr` may be unset (the paper's per backend) or a mapping by backend
        f = ctx.suite.finetune
        return Measurement(values, {"tokens_per_s": "tokens/s", "peak_memory_gib": "GiB"},
                           {**f.model_dump(), "lr": f.lr_for(ctx.backend.name), "backend_options": ctx.backend.options},
                           model=info,
                           kernel=", ".join(kernels), seconds=round(values.get("seconds", 0.0), 1))

    def section(self, records):
        from harness.report.training import training_section

        return training_section(records)
