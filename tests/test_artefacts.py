"""Built model variants: a fine-tune is a function of the suite and seed, not of the process that ran it."""

import shutil

import pytest
import torch

from harness import artefacts, cache, hardware, results
from harness.errors import UserError
from harness.plan import documents
from harness.suite import load_suite

SUITE = """
name: tiny
methods: [lora]
backends: [full]
pretrain: {context: 64, steps: 2, batch_size: 2, warmup_steps: 1}
finetune: {context: 128, steps: 3, warmup_steps: 1}
metrics:
  perplexity: {contexts: [64]}
"""


def test_finetune_is_reproducible_whatever_the_global_rng_state(tmp_path, monkeypatch):
    (tmp_path / "s.yaml").write_text(SUITE)
    suite = load_suite(tmp_path / "s.yaml")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    artefacts.pretrained(suite, "tiny-hybrid", 0)
    built = []
    for global_seed in (1, 2):
        # The pretrained model comes from the cache and the global RNG starts elsewhere, as in a new process.
        shutil.rmtree(cache.cache_root() / artefacts.ADAPTER, ignore_errors=True)
        torch.manual_seed(global_seed)
        model, info = artefacts.finetuned(suite, "tiny-hybrid", 0, "lora", suite.backends[0],
                                          documents(suite, "train"))
        built.append((model.state_dict(), info["train"]["loss_curve"]))
        assert info["trained_on"] == hardware.describe(results.environment())  # the builder: its CPU, or its GPU
    (a, curve_a), (b, curve_b) = built
    assert curve_a == curve_b
    adapters = [e["what"] for e in cache.entries() if e["kind"] == artefacts.ADAPTER]  # as `harness cache ls` shows
    assert adapters == [f"tiny-hybrid seed 0: lora/full @ {suite.finetune.context}"], adapters
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_fixed_pretrain_seed_shares_one_pretrained_model_over_seeds(tmp_path):
    (tmp_path / "s.yaml").write_text(SUITE + "seeds: [0, 1]\n")
    own = load_suite(tmp_path / "s.yaml")
    assert artefacts.base_info(own, "tiny-hybrid", 0)["hash"] != artefacts.base_info(own, "tiny-hybrid", 1)["hash"]
    (tmp_path / "s.yaml").write_text(SUITE.replace("warmup_steps: 1}", "warmup_steps: 1, seed: 0}", 1)
                                     + "seeds: [0, 1]\n")
    shared = load_suite(tmp_path / "s.yaml")
    assert artefacts.base_info(shared, "tiny-hybrid", 1) == artefacts.base_info(own, "tiny-hybrid", 0)
    a, b = (artefacts.adapter_key(shared, "tiny-hybrid", s, "lora", shared.backends[0],
                                  documents(shared, "train"))[0] for s in (0, 1))
    assert a != b  # the fine-tunes still differ by seed


def test_finetuning_takes_longloras_adamw_and_pretraining_its_own(tmp_path):
    """LongLoRA fine-tunes with the Hugging Face Trainer's AdamW defaults, betas (0.9, 0.999) and no weight decay;
    pretraining uses (0.9, 0.95) and weight decay 0.1."""
    (tmp_path / "s.yaml").write_text(SUITE)
    suite = load_suite(tmp_path / "s.yaml")
    finetune = artefacts.finetune_config(suite, "lora", suite.backends[0], 0)
    pretrain = artefacts.pretrain_config(suite, 0)
    assert (finetune.betas, finetune.weight_decay) == ((0.9, 0.999), 0.0)
    assert (pretrain.betas, pretrain.weight_decay) == ((0.9, 0.95), 0.1)


def test_how_often_a_finetune_checkpoints_is_a_run_setting_outside_its_key(tmp_path):
    (tmp_path / "often.yaml").write_text(SUITE + "run: {checkpoint_every: 1}\n")
    (tmp_path / "s.yaml").write_text(SUITE)
    often, default = (load_suite(tmp_path / f) for f in ("often.yaml", "s.yaml"))
    configs = [artefacts.finetune_config(s, "lora", s.backends[0], 0) for s in (often, default)]
    assert [c.checkpoint_every for c in configs] == [1, 50]
    data = documents(default, "train")
    a, b = (artefacts.adapter_key(s, "tiny-hybrid", 0, "lora", s.backends[0], data)[0] for s in (often, default))
    assert a == b  # the same fine-tune: an interrupted one resumes whichever was set when it stopped


@pytest.mark.parametrize("change", [
    "finetune: {context: 128, steps: 3, warmup_steps: 1, rank: 4}",
    "finetune: {context: 128, steps: 3, warmup_steps: 1, alpha: 8}",
    "finetune: {context: 128, steps: 4, warmup_steps: 1}",
    "finetune: {context: 256, steps: 3, warmup_steps: 1}",
    "finetune: {context: 128, steps: 3, warmup_steps: 2}",
    "finetune: {context: 128, steps: 3, warmup_steps: 1, lr: 1.0e-3}",
    "finetune: {context: 128, steps: 3, warmup_steps: 1, batch_size: 2}",
    "finetune: {context: 128, steps: 3, warmup_steps: 1, grad_accum: 1}",
    "finetune: {context: 256, steps: 3, warmup_steps: 1, recall: 0.5}",
    "finetune: {context: 128, steps: 3, warmup_steps: 1, gradient_checkpointing: true}",
    "backends: [{sliding_window: {window: 32}}]",
    "data: {train: {source: embedded, max_tokens: 5000}}",
    "pretrain: {context: 64, steps: 3, batch_size: 2, warmup_steps: 1}",
    "pretrain: {context: 64, steps: 2, batch_size: 2, warmup_steps: 1, answer_weight: 3.0}",
    "pretrain: {context: 64, steps: 2, batch_size: 2, warmup_steps: 1, recall: 0.25}",
    "pretrain: {context: 64, steps: 2, batch_size: 2, warmup_steps: 1, induction_init: 2.0}",
])
def test_every_input_of_a_finetune_is_in_its_key(tmp_path, change):
    """A fine-tune's cache key moves with each thing that determines it (recipe, LoRA shape, backend options, the
    data, the pretrained model under it): a key that missed one would serve a stale adapter to cells whose own
    settings hash did change, and so were measured again."""
    def key(text: str) -> tuple[str, str]:
        (tmp_path / "s.yaml").write_text(text)
        s = load_suite(tmp_path / "s.yaml")
        return (artefacts.adapter_key(s, "tiny-hybrid", 0, "lora", s.backends[0], documents(s, "train"))[0],
                artefacts.base_info(s, "tiny-hybrid", 0)["hash"])

    base = SUITE.replace("backends: [full]", "backends: [{sliding_window: {window: 64}}]")
    field = change.split(":")[0]
    line = next(x for x in base.splitlines() if x.startswith(f"{field}:")) if f"\n{field}:" in base else None
    changed = base.replace(line, change) if line else base + change + "\n"
    (adapter, pretrained), (adapter2, pretrained2) = key(base), key(changed)
    assert adapter != adapter2
    assert (pretrained != pretrained2) == (field == "pretrain")


def test_the_recall_rows_of_a_finetune_are_in_its_key(tmp_path):
    """Their share and their answers' weight change what is trained (the case above also changes the context)."""
    keys = []
    for recall in ("recall: 0.5", "recall: 0.25", "recall: 0.5, answer_weight: 3.0"):
        (tmp_path / "s.yaml").write_text(SUITE.replace("context: 128", f"context: 256, {recall}"))
        s = load_suite(tmp_path / "s.yaml")
        keys.append(artefacts.adapter_key(s, "tiny-hybrid", 0, "lora", s.backends[0], documents(s, "train"))[0])
    assert len(set(keys)) == 3


def test_the_process_count_and_strategy_of_a_finetune_are_in_its_key(tmp_path):
    """On more processes a recipe trains on a larger global batch, its gradients summed as the strategy does: a
    key without them served a one-process adapter to a two-process suite. One process has no strategy."""
    keys = []
    for run in ("", "run: {strategy: fsdp}\n", "run: {nproc: 2}\n", "run: {nproc: 2, strategy: fsdp}\n"):
        (tmp_path / "s.yaml").write_text(SUITE + run)
        s = load_suite(tmp_path / "s.yaml")
        keys.append(artefacts.adapter_key(s, "tiny-hybrid", 0, "lora", s.backends[0], documents(s, "train"))[0])
    assert keys[0] == keys[1] and len(set(keys)) == 3


def test_an_edit_to_the_fine_tuning_code_moves_the_adapters_key_only(tmp_path, monkeypatch):
    """The adapter's key holds the code that builds adapters (provenance.ADAPTER), the pretrained model's that
    which pretrains: an edit to a LoRA method rebuilds the adapters, and not the model under them."""
    from harness import provenance

    (tmp_path / "s.yaml").write_text(SUITE)
    s = load_suite(tmp_path / "s.yaml")
    keys = []
    for edited in ((), provenance.ADAPTER):
        monkeypatch.setattr(provenance, "artefact_fingerprint", lambda modules, e=edited: str(modules == e))
        keys.append((artefacts.base_info(s, "tiny-hybrid", 0)["hash"],
                     artefacts.adapter_key(s, "tiny-hybrid", 0, "lora", s.backends[0], documents(s, "train"))[0]))
    (base, adapter), (base2, adapter2) = keys
    assert base == base2 and adapter != adapter2


def test_a_preset_is_pretrained_with_the_embedded_tokenizers_vocabulary(tmp_path):
    """A preset's own vocabulary (50277 for mamba2attn-2.7b) would leave most of its embedding rows untrained."""
    (tmp_path / "s.yaml").write_text(SUITE)
    s = load_suite(tmp_path / "s.yaml")
    _, config, _ = artefacts._pretrained_spec(s, "mamba2attn-2.7b", 0)
    assert config.vocab_size == len(artefacts.default_tokenizer())

def test_the_embedded_corpus_and_tokenizer_are_in_a_pretrained_models_key(tmp_path, monkeypatch):
    """Their code is in no key (harness.provenance): their content's fingerprints are what a new corpus or
    tokenizer changes."""
    from types import SimpleNamespace

    (tmp_path / "s.yaml").write_text(SUITE)
    s = load_suite(tmp_path / "s.yaml")
    keys = [artefacts.base_info(s, "tiny-hybrid", 0)["hash"]]
    corpus = artefacts.default_corpus()
    monkeypatch.setattr(artefacts, "default_corpus", lambda: SimpleNamespace(name=corpus.name, fingerprint="other"))
    keys.append(artefacts.base_info(s, "tiny-hybrid", 0)["hash"])
    monkeypatch.setattr(artefacts, "tokenizer_fingerprint", lambda tok: "other")
    keys.append(artefacts.base_info(s, "tiny-hybrid", 0)["hash"])
    assert len(set(keys)) == 3


def test_settings_a_finetune_does_not_use_stay_out_of_its_keys(tmp_path):
    """An LR for another backend, the LR scale of fully trained parameters for plain LoRA (nothing trains beside
    its adapters), LoRA's rank for `full`: changing them neither trains nor measures anything again."""
    from harness.plan import plan

    finetune = "finetune: {context: 128, steps: 3, warmup_steps: 1"
    keys, hashes = {}, {}
    for name, extra in (("same", ""), ("s2_lr", ", lr: {default: 2.0e-4, s2_attn: 1.0e-5}"),
                        ("scale", ", extra_lr_scale: 0.1"), ("rank", ", rank: 4")):
        text = SUITE.replace("methods: [lora]\nbackends: [full]", "methods: [lora, hylora, full]\n"
                             "backends: [full, s2_attn]").replace(finetune, finetune + extra)
        (tmp_path / f"{name}.yaml").write_text(text)
        s = load_suite(tmp_path / f"{name}.yaml")
        data = documents(s, "train")
        keys[name] = {(m, b.name): artefacts.adapter_key(s, "tiny-hybrid", 0, m, b, data)[0]
                      for m in s.methods for b in s.backends}
        hashes[name] = {c["id"]: c["hash"] for j in plan(s, data.fingerprint) for c in j.cells}
    assert len(hashes["same"]) == 2 + 6 * 2  # pretrain, pretrained ppl, and each variant's train and ppl

    def changed(name):
        return ({v for v, k in keys[name].items() if k != keys["same"][v]},
                {tuple(i.split("/")[2:4]) for i, h in hashes[name].items() if h != hashes["same"][i]})

    for name, moved in (("s2_lr", {(m, "s2_attn") for m in ("lora", "hylora", "full")}),
                        ("scale", {("hylora", "full"), ("hylora", "s2_attn")}),
                        ("rank", {(m, b) for m in ("lora", "hylora") for b in ("full", "s2_attn")})):
        assert changed(name) == (moved, moved), name


def test_a_finetune_with_spread_recall_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    text = SUITE.replace("finetune: {context: 128, steps: 3, warmup_steps: 1}",
                         "finetune: {context: 256, steps: 2, warmup_steps: 1, recall: 0.5}")
    (tmp_path / "s.yaml").write_text(text)
    suite = load_suite(tmp_path / "s.yaml")
    (tmp_path / "plain.yaml").write_text(text.replace(", recall: 0.5", ""))
    plain = load_suite(tmp_path / "plain.yaml")
    data = documents(suite, "train")
    key, info = artefacts.adapter_key(suite, "tiny-hybrid", 0, "lora", suite.backends[0], data)
    assert key != artefacts.adapter_key(plain, "tiny-hybrid", 0, "lora", plain.backends[0], data)[0]
    assert info["finetune_recall"] == 0.5 and "finetune_recall" not in artefacts.adapter_key(
        plain, "tiny-hybrid", 0, "lora", plain.backends[0], data)[1]
    assert "recall" not in plain.finetune.recipe("lora", "full")
    assert suite.finetune.recipe("lora", "full")["recall"] == 0.5
    _, built = artefacts.finetuned(suite, "tiny-hybrid", 0, "lora", suite.backends[0], data)
    assert len(built["train"]["loss_curve"]) == 2


def test_compiled_pretraining_without_a_compiler_names_the_field_and_the_fix(tmp_path, monkeypatch):
    (tmp_path / "s.yaml").write_text(SUITE.replace("warmup_steps: 1}", "warmup_steps: 1, compile: true}", 1))
    suite = load_suite(tmp_path / "s.yaml")
    assert artefacts.pretrain_config(suite, 0).compile
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(UserError, match=r"pretrain\.compile.*'no-such-compiler'.*compile: false"):
        artefacts.pretrained(suite, "tiny-hybrid", 0)


def test_pretraining_starts_from_its_seed_and_trains_on_the_recipes_recall_rows(tmp_path, monkeypatch):
    """The initial weights follow the recipe's seed, not the process's global RNG; with `recall` (0.5 by default)
    a share of each batch is recall documents, their answers at `answer_weight` and the rest at 1."""
    from harness import pretraining

    recipe = "context: 256, steps: 2, batch_size: 2, warmup_steps: 1, answer_weight: 3.0}"
    (tmp_path / "s.yaml").write_text(SUITE.replace("context: 64, steps: 2, batch_size: 2, warmup_steps: 1}", recipe))
    suite = load_suite(tmp_path / "s.yaml")
    _, config, cfg = artefacts._pretrained_spec(suite, "tiny-hybrid", 0)
    monkeypatch.setattr(pretraining, "train_into_cache", lambda model, cfg, batches, *args: batches)  # untrained
    built = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        built.append(pretraining.pretrain(suite, config, cfg, artefacts.PRETRAINED, "key", "pretrain",
                                          torch.device("cpu")))
    (a, batches), (b, _) = built
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), n
    g = torch.Generator().manual_seed(0)
    drawn = [batches(g, step) for step in range(8)]  # a row's answers may lie beyond its 256 tokens
    ids, weights = torch.cat([i for i, _ in drawn]), torch.cat([w for _, w in drawn])
    assert ids.shape == weights.shape == (16, 256) and set(weights.unique().tolist()) == {1.0, 3.0}
