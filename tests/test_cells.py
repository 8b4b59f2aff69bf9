"""Cell ids: derived from the types and parsed back by the same module, for every kind of cell."""

import pytest

from harness.cells import Cell, Variant

SE = "se_attn(chunk_size=256/512,block_size=16,top_k=8)"  # labels may hold "/"
PRE, FT = Variant("tiny-hybrid", 0), Variant("tiny-hybrid", 3, "hylora", SE, 4096)
CELLS = [
    (Cell("pretrain", PRE), "tiny-hybrid/seed0/pretrain"),
    (Cell("train", FT), f"tiny-hybrid/seed3/hylora/{SE}/train"),
    (Cell("perplexity", PRE, 512), "tiny-hybrid/seed0/pretrained/ppl@512"),
    (Cell("perplexity", Variant("tiny-hybrid", -1), 512), "tiny-hybrid/seed-1/pretrained/ppl@512"),  # seeds: any int
    (Cell("perplexity", FT, 2048), f"tiny-hybrid/seed3/hylora/{SE}/ppl@2048"),
    (Cell("perplexity", FT, 2048, eval_attention="finetune"), f"tiny-hybrid/seed3/hylora/{SE}/eval-finetune/ppl@2048"),
    (Cell("ruler", FT, 1024, "niah_single_1"), f"tiny-hybrid/seed3/hylora/{SE}/ruler/niah_single_1@1024"),
    (Cell("ruler", FT, 1024, "vt", "finetune"), f"tiny-hybrid/seed3/hylora/{SE}/eval-finetune/ruler/vt@1024"),
    (Cell("lm_eval", PRE, task="harness_mc"), "tiny-hybrid/seed0/pretrained/lm_eval/harness_mc"),
    (Cell("efficiency", length=8192, backend=SE), f"attention/{SE}/efficiency@8192"),
    # a plugin's metrics: {metric}[:{task}][@{length}]
    (Cell("toy", PRE, 3, "a"), "tiny-hybrid/seed0/pretrained/toy:a@3"),
    (Cell("toy", FT, eval_attention="finetune"), f"tiny-hybrid/seed3/hylora/{SE}/eval-finetune/toy"),
    (Cell("flops", length=8, backend=SE), f"attention/{SE}/flops@8"),
]


@pytest.mark.parametrize("cell, cell_id", CELLS, ids=[i for _, i in CELLS])
def test_id_and_parse_round_trip(cell, cell_id):
    assert cell.id == cell_id
    assert Cell.parse(cell_id, finetune_context=cell.variant and cell.variant.finetune_context) == cell
    assert cell.as_dict()["id"] == cell_id


def test_variant_stage_and_dict():
    assert (PRE.stage, FT.stage) == ("pretrained", "finetuned")
    assert FT.as_dict() == {"model": "tiny-hybrid", "seed": 3, "method": "hylora", "backend": SE,
                            "finetune_context": 4096, "stage": "finetuned"}


@pytest.mark.parametrize("bad", ["", "ppl@512", "tiny/seed0/ppl@512", "tiny/s0/pretrained/ppl@512",
                                 "tiny/seed0/pretrained/ppl@x", "attention/full",
                                 "tiny/seed0/lora/full/ppl", "tiny/seed0/pretrained/train@3"])
def test_what_is_not_a_cell_id_is_refused(bad):
    with pytest.raises(ValueError, match="not a cell id"):
        Cell.parse(bad)
