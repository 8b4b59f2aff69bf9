"""A metric of one's own in one file: named in a suite's `plugins:`, it is planned, measured in the job's process,
recorded with its code fingerprint, and reported in its own section."""

import pytest

from harness import results
from harness.errors import UserError
from harness.runner import run_suite
from harness.suite import load_suite

PLUGIN = '''
"""A toy metric: the number of parameters of each variant, scaled by `factor`, per length."""

from pydantic import Field

from harness.cells import Cell
from harness.metrics.base import Measurement, Metric, Strict, register


class ToyConfig(Strict):
    lengths: list[int] = Field(min_length=1)
    factor: float = 1.0


@register
class Toy(Metric):
    name = "toy"
    config = ToyConfig

    def cells(self, config, variant, plan):
        return [(Cell("toy", variant, n), {"metric": config.model_dump(exclude={"lengths"})})
                for n in config.lengths]

    def measure(self, ctx, cell, config):
        model, info = ctx.model()
        params = sum(p.numel() for p in model.parameters())
        values = {"scaled_params": params * config.factor * cell["length"]}
        warnings = [f"length {cell['length']} is odd"] if cell["length"] % 2 else []
        return Measurement(values, settings={"factor": config.factor}, model=info, warnings=warnings)

    def section(self, records):
        from harness.report.common import paragraph

        mine = [r for r in records if r.metric == "toy"]
        if not mine:
            return None
        text = "; ".join(f"{r.eval_context}: {r.values.get('scaled_params')}" for r in mine)
        return {"id": "toy", "title": "Toy metric", "blocks": [paragraph(text)]}
'''

SUITE = """
name: toy
plugins: [toy_metric]
methods: []
pretrain: {context: 32, steps: 2, batch_size: 1, warmup_steps: 0, recall: 0, induction_init: null}
metrics:
  toy: {lengths: [1, 2], factor: 0.5}
"""


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "toy_metric.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "plugins"))  # the job processes import it too
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HARNESS_PG19_DIR", raising=False)
    return tmp_path


def test_a_toy_metric_is_planned_measured_recorded_and_reported(plugin_dir, capfd):
    (plugin_dir / "s.yaml").write_text(SUITE)
    report = run_suite(plugin_dir / "s.yaml", plugin_dir / "out").report
    recs = [r for r in results.load(plugin_dir / "out") if r.metric == "toy"]
    assert all(r.status == "ok" and r.code["fingerprint"] for r in recs), [r.error for r in recs]
    one, two = (r.values["scaled_params"] for r in recs)
    assert two == 2 * one > 0 and recs[0].settings == {"eval_attention": "full", "factor": 0.5}
    html = report.read_text()
    assert ">Toy metric</h" in html and f"1: {one}" in html
    # what a measurement finds suspect in itself: on the console, in the record and in the report's header
    assert [r.warnings for r in recs] == [["length 1 is odd"], []]
    assert "  warning: tiny-hybrid/seed0/pretrained/toy@1: length 1 is odd" in capfd.readouterr().out
    assert "1 warning(s) from the measurements, to read their numbers with: tiny-hybrid/seed0/pretrained/toy@1: " \
           "length 1 is odd." in html
    run_suite(plugin_dir / "s.yaml", plugin_dir / "out", dry_run=True)
    assert "3 cells in 2 jobs, 3 already recorded" in capfd.readouterr().out


def test_a_plugin_config_is_validated_like_any_suite_field(plugin_dir):
    (plugin_dir / "s.yaml").write_text(SUITE.replace("factor: 0.5", "factr: 0.5"))
    with pytest.raises(UserError, match=r"line 7: metrics.toy.factr: unknown field \(did you mean 'factor'\?\)"):
        load_suite(plugin_dir / "s.yaml")
    (plugin_dir / "s.yaml").write_text(SUITE.replace("[toy_metric]", "[toy_metrc]"))
    with pytest.raises(UserError, match=r"line 3: plugins\[0\]: cannot import 'toy_metrc'"):
        load_suite(plugin_dir / "s.yaml")


SHARES = '''
"""A metric measured on every rank: each sends its rank and the cell's length; rank 1 fails the first cell (raises,
or with $SHARES_DIE set, dies)."""

import os

from pydantic import Field

from harness.cells import Cell
from harness.metrics.base import Measurement, Metric, Strict, register


class SharesConfig(Strict):
    lengths: list[int] = Field(min_length=1)


@register
class Shares(Metric):
    name = "shares"
    config = SharesConfig
    ranks = True

    def cells(self, config, variant, plan):
        return [(Cell("shares", variant, n), {}) for n in config.lengths]

    def measure(self, ctx, cell, config):
        if cell["length"] == 1 and ctx.ranks.rank == 1:
            if os.environ.get("SHARES_DIE"):
                os._exit(3)
            raise ValueError("rank 1 fails the first cell")
        return Measurement({"parts": ctx.ranks.gather([ctx.ranks.rank, cell["length"]])})
'''


@pytest.mark.parametrize("failure", ["raises", "dies"])
def test_on_two_ranks_a_cell_failing_on_one_is_recorded_and_the_next_measured_on_both(plugin_dir, monkeypatch,
                                                                                       failure):
    (plugin_dir / "plugins" / "shares_metric.py").write_text(SHARES)
    if failure == "dies":  # torchrun ends the other rank and the job; the runner records the cell, starts again
        monkeypatch.setenv("SHARES_DIE", "1")
    suite = SUITE.replace("[toy_metric]", "[toy_metric, shares_metric]") + "  shares: {lengths: [1, 2, 3]}\n"
    (plugin_dir / "s.yaml").write_text(suite + "run: {nproc: 2}\n")
    run_suite(plugin_dir / "s.yaml", plugin_dir / "out")
    recs = {r.cell: r for r in results.load(plugin_dir / "out")}
    first, second, third = (recs[f"tiny-hybrid/seed0/pretrained/shares@{n}"] for n in (1, 2, 3))
    assert (first.status, first.error) == ("error", "RuntimeError: rank 1: ValueError: rank 1 fails the first cell"
                                           if failure == "raises" else "job process exited with code 1")
    assert second.values["parts"] == [[0, 2], [1, 2]] and third.values["parts"] == [[0, 3], [1, 3]]
    assert second.status == "ok" and second.settings["ranks"] == 2
    toy = [r for r in recs.values() if r.metric == "toy"]  # measured by rank 0 alone, while rank 1 waited
    assert len(toy) == 2 and all(r.status == "ok" and "ranks" not in r.settings for r in toy)
