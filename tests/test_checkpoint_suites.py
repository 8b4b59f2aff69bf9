"""Suites on checkpoints (harness.models.sources): tiny ones written here in each format, all through one whole
run (one method x two backends, perplexity at two lengths, niah_single_1, report), the bad entries, and the
pretrained perplexity of a Llama against plain transformers."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
import transformers as T

from harness import results
from harness.cli import main
from harness.data import default_corpus, train_tokenizer
from harness.errors import UserError
from harness.models import HybridConfig, HybridForCausalLM
from harness.models.sources import Checkpoint, load_model, load_tokenizer, resolve

V = 512  # the tokenizer's vocabulary; every model here has exactly as many embeddings
MAMBA_SSM = {"d_model": 32, "d_intermediate": 0, "n_layer": 3, "vocab_size": V, "attn_layer_idx": [1],
             "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 16},
             "attn_cfg": {"causal": True, "d_conv": 4, "head_dim": 16, "num_heads": 2, "rotary_emb_dim": 8},
             "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
             "tie_embeddings": True}
HF = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512)),
    "bamba": lambda: T.BambaForCausalLM(T.BambaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, max_position_embeddings=512)),
    "zamba2": lambda: T.Zamba2ForCausalLM(T.Zamba2Config(
        vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
        mamba_d_state=8, mamba_headdim=16, n_mamba_heads=4, mamba_ngroups=1, chunk_size=16,
        layers_block_type=["mamba", "hybrid", "mamba"], num_mem_blocks=1, intermediate_size=64,
        max_position_embeddings=512)),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(default_corpus(), V).save_pretrained(path)
    return path


def write_mamba_ssm(path, sharded: bool):
    """A random HybridForCausalLM saved as mamba_ssm does (config.json without model_type): one pytorch_model.bin,
    or two safetensors shards and their index."""
    torch.manual_seed(0)
    model = HybridForCausalLM(HybridConfig(**MAMBA_SSM))
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(MAMBA_SSM))
    state = model.state_dict()
    if not sharded:
        torch.save(state, path / "pytorch_model.bin")
        return
    from safetensors.torch import save_file

    state.pop("lm_head.weight")  # tied: safetensors drops shared tensors
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(path / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def write_hf(path, arch, tokenizer_dir):
    torch.manual_seed(0)
    HF[arch]().save_pretrained(path)
    T.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)


def entry(tmp_path, kind, tokenizer_dir) -> dict:
    """The `models:` mapping of a tiny checkpoint of `kind`, written under tmp_path."""
    path = tmp_path / kind
    if kind.startswith("mamba_ssm"):
        write_mamba_ssm(path, sharded=kind.endswith("sharded"))
        return {"name": kind.replace("_", "-"), "path": str(path), "tokenizer": str(tokenizer_dir), "context": 32}
    write_hf(path, kind, tokenizer_dir)
    return {"name": kind, "path": str(path), "context": 32}


SUITE = """\
name: ckpt
models: {models}
methods: [lora]
backends: [full, {{sliding_window: {{window: 16}}}}]
finetune: {{context: 64, steps: 2, batch_size: 1, grad_accum: 1, warmup_steps: 0}}
data:
  train: {{source: embedded, max_tokens: 4000}}
  eval: {{source: embedded, split: test, max_tokens: 3000}}
metrics:
  perplexity: {{contexts: [32, 64], tokens_per_length: 256}}
  ruler: {{tasks: [niah_single_1], lengths: [512], samples: 2}}
"""


def run(tmp_path, capsys, model: dict | list[dict], *extra, suite: str = SUITE) -> tuple[int, str]:
    (tmp_path / "s.yaml").write_text(suite.format(models=json.dumps(model if isinstance(model, list) else [model])))
    code = main(["run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HARNESS_PG19_DIR", raising=False)


def test_a_whole_suite_runs_on_a_checkpoint_of_each_format(tmp_path, capsys, isolated, tokenizer_dir):
    """One suite over all of them, as a lab compares its models side by side. Fine-tuned with a sliding window
    only (it goes through each architecture's attention as well as LoRA; full attention is what evaluates), and
    one RULER sample: generation is most of the time."""
    models = [entry(tmp_path, kind, tokenizer_dir) for kind in ("mamba_ssm", "mamba_ssm_sharded", "llama", "bamba",
                                                                 "zamba2")]
    suite = SUITE.replace("backends: [full, ", "backends: [").replace("samples: 2", "samples: 1")
    code, out = run(tmp_path, capsys, models, suite=suite)
    assert code == 0, out
    records = results.current(results.load(tmp_path / "out"))
    assert all(r.status == "ok" for r in records), [(r.cell, r.error) for r in records if r.status != "ok"]
    by_cell = {r.cell: r for r in records}
    expected = set()
    for name in (m["name"] for m in models):
        expected |= {f"{name}/seed0/{v}/{m}" for v in ("pretrained", "lora/sliding_window(window=16)")
                     for m in ("ppl@32", "ppl@64", "ruler/niah_single_1@512")} | {
            f"{name}/seed0/lora/sliding_window(window=16)/train"}
        assert f"{name}/seed0/pretrain" not in by_cell  # a checkpoint is not pretrained
        ppl = by_cell[f"{name}/seed0/pretrained/ppl@32"]
        assert ppl.model["name"] == name and ppl.model["pretrain_context"] == 32 and len(ppl.model["hash"]) == 16
        assert math.isfinite(ppl.values["perplexity"]) and ppl.values["perplexity"] > 1, name
    assert set(by_cell) == expected, sorted(set(by_cell) ^ expected)
    assert (tmp_path / "out" / "index.html").is_file()
    code, out = run(tmp_path, capsys, models, "--dry-run", suite=suite)  # everything recorded: nothing left to do
    assert code is None or code == 0
    assert "0 already recorded" not in out and f"{len(expected)} already recorded" in out, out


def longlora_windows(n: int, context: int, step: int, budget: int) -> list[int]:
    """LongLoRA's window starts (every `step` while a window fits), thinned to `budget` evenly spaced ones."""
    starts = list(range(0, n - context + 1, step))
    if len(starts) <= budget:
        return starts
    return [starts[round(i * (len(starts) - 1) / (budget - 1))] for i in range(budget)]


def test_llama_perplexity_matches_plain_transformers(tmp_path, capsys, isolated, tokenizer_dir):
    model = entry(tmp_path, "llama", tokenizer_dir)
    code, out = run(tmp_path, capsys, model, "--only", "*/pretrained/ppl@64")
    assert code == 0, out
    (rec,) = results.current(results.load(tmp_path / "out"))
    # independently: the documents tokenized one by one, joined by eos, windows scored by the plain model
    tok = T.AutoTokenizer.from_pretrained(tmp_path / "llama")
    ids: list[int] = []
    for doc in default_corpus().split("test"):
        ids += ([tok.eos_token_id] if ids else []) + tok(doc.text, add_special_tokens=False)["input_ids"]
        if len(ids) >= 3000:
            break
    stream = torch.tensor(ids[:3000])
    llama = T.AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    nll, count, scored_bytes = 0.0, 0, 0
    for s in longlora_windows(len(stream), 64, 256, 256 // 64):
        with torch.no_grad():
            logits = llama(stream[None, s:s + 64]).logits[0, :-1].double()
        nll += F.cross_entropy(logits, stream[s + 1:s + 64], reduction="sum").item()
        count += 63
        scored_bytes += len(tok.decode(ids[s + 1:s + 64], skip_special_tokens=True).encode("utf-8"))
    assert rec.values["tokens_scored"] == count
    assert rec.values["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    text_bytes = len(tok.decode(ids[:3000], skip_special_tokens=True).encode("utf-8"))
    assert rec.dataset["bytes"] == text_bytes and rec.dataset["tokens"] == 3000
    assert rec.values["bits_per_byte"] == pytest.approx(nll / math.log(2) / scored_bytes, rel=1e-5)


@pytest.mark.parametrize(("case", "message"), [
    ("missing path", r"models.m.path: .*nowhere does not exist"),
    ("tokenizer is a file", r"models.m.tokenizer: .*tokenizer.json is a file; fix: the directory that holds it"),
    ("missing tokenizer", r"models.m.tokenizer: .*nowhere does not exist; fix: a directory or a hub id"),
    ("hf read as mamba_ssm", r"config.json: no d_model.*fix: it is a transformers config \(model_type 'llama'\): "
                             r"`format: hf`"),
    ("mamba_ssm read as hf", r"models.m.format: hf, but .*config.json has no model_type.*fix: `format: mamba_ssm`"),
    ("no config", r"models.m: .* has no config.json"),
    ("bad config", r"models.m: .*config.json is unreadable"),
    ("unknown config key", r"models.m: .*HybridConfig: unknown field 'd_modle'"),
    ("missing weights", r"models.m: .* has no weights"),
    ("unexpected weights", r"models.m: .* does not match .* unexpected \(1\): extra.weight"),
    ("missing keys", r"models.m: .* missing \(1\): backbone.norm_f.weight"),
    ("no tokenizer", r"models.m: no tokenizer in .*mamba_ssm directory ships none: set `tokenizer:`"),
    ("tokenizer too large", r"models.m: the tokenizer has 512 tokens, more than the model's 256 embeddings"),
    ("hub id not cached", r"models.m.path: no-such-org/no-such-model is not a directory and not in the HF cache"),
    ("no context", r"models.m: set `context:`"),
])
def test_bad_checkpoints_are_named(tmp_path, monkeypatch, isolated, tokenizer_dir, case, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "m"
    fields = {"name": "m", "path": str(path), "tokenizer": str(tokenizer_dir), "context": 32}
    if case not in ("missing path", "hub id not cached"):
        write_mamba_ssm(path, sharded=False)
    state = lambda: torch.load(path / "pytorch_model.bin", weights_only=True)  # noqa: E731
    if case == "missing path":
        fields["path"] = str(tmp_path / "nowhere")
    elif case == "hub id not cached":
        fields["path"] = "no-such-org/no-such-model"
    elif case == "no config":
        (path / "config.json").unlink()
    elif case == "bad config":
        (path / "config.json").write_text("{not json")
    elif case == "unknown config key":
        (path / "config.json").write_text(json.dumps({**MAMBA_SSM, "d_modle": 3}))
    elif case == "missing weights":
        (path / "pytorch_model.bin").unlink()
    elif case == "unexpected weights":
        torch.save({**state(), "extra.weight": torch.zeros(1)}, path / "pytorch_model.bin")
    elif case == "missing keys":
        s = state()
        del s["backbone.norm_f.weight"]
        torch.save(s, path / "pytorch_model.bin")
    elif case == "no tokenizer":
        del fields["tokenizer"]
    elif case == "tokenizer is a file":
        fields["tokenizer"] = str(next(tokenizer_dir.glob("tokenizer*.json")))
    elif case == "missing tokenizer":
        fields["tokenizer"] = str(tmp_path / "nowhere")
    elif case == "hf read as mamba_ssm":
        write_hf(tmp_path / "llama", "llama", tokenizer_dir)
        fields.update(path=str(tmp_path / "llama"), format="mamba_ssm")
    elif case == "mamba_ssm read as hf":
        fields["format"] = "hf"
    elif case == "tokenizer too large":
        small = {**MAMBA_SSM, "vocab_size": 256}
        (path / "config.json").write_text(json.dumps(small))
        torch.manual_seed(0)
        torch.save(HybridForCausalLM(HybridConfig(**small)).state_dict(), path / "pytorch_model.bin")
    elif case == "no context":
        del fields["context"]
    with pytest.raises(UserError, match=message) as e:
        r = resolve(Checkpoint(**fields))
        load_tokenizer(r, load_model(r))
    assert "\n" not in str(e.value)


ABSOLUTE = {  # learned absolute positions, for `position_limit`
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_positions=48, n_embd=16, n_layer=1, n_head=2)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=V, max_position_embeddings=40, hidden_size=16, ffn_dim=32,
                                                num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=16)),
}


@pytest.mark.parametrize("arch, limit", [("gpt2", 48), ("opt", 40), ("llama", None), ("bamba", None)])
def test_the_position_limit_is_that_of_learned_absolute_positions(tmp_path, isolated, arch, limit):
    from harness.models.sources import meta_model, position_limit

    torch.manual_seed(0)
    {**HF, **ABSOLUTE}[arch]().save_pretrained(tmp_path / arch)  # OPT's table has 2 rows more than its positions
    assert position_limit(meta_model(resolve(Checkpoint(name=arch, path=str(tmp_path / arch), context=16)))) == limit
    if limit:  # and their context, the "1x", is that many tokens unless the entry says otherwise
        assert resolve(Checkpoint(name=arch, path=str(tmp_path / arch))).context == limit


def test_lengths_beyond_learned_positions_stop_the_run_before_any_job(tmp_path, capsys, isolated, tokenizer_dir):
    path = tmp_path / "gpt2"
    ABSOLUTE["gpt2"]().save_pretrained(path)
    T.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    code, out = run(tmp_path, capsys, {"name": "g", "path": str(path), "context": 32})
    assert code == 2, out
    assert (f"error: {tmp_path / 's.yaml'}: line 2: models.g: gpt2 has learned absolute positions for 48 tokens, "
            "and the suite asks it for 64, 512; "
            "fix: keep metrics' lengths and finetune.context at or below 48") in out, out
    assert not (tmp_path / "out" / results.RESULTS_FILE).exists()
    assert not any((tmp_path / "cache").glob("adapter/*"))


MAMBA2 = lambda: T.Mamba2ForCausalLM(T.Mamba2Config(  # noqa: E731 - an HF model without attention
    vocab_size=V, hidden_size=32, num_hidden_layers=1, num_heads=4, head_dim=16, state_size=8, n_groups=1,
    chunk_size=16, expand=2))


@pytest.mark.parametrize("case, message", [
    ("backend", "models.m: mamba2 has no attention that goes through transformers' AttentionInterface, so only the "
                "`full` backend applies to it; fix: drop sliding_window(window=16) from backends, or this model"),
    ("lora", "models.m: Mamba2ForCausalLM: no attention projection found"),
    ("vocabulary", f"models.m: the tokenizer has {V} tokens, more than the model's 64 embeddings"),
])
def test_a_checkpoint_every_cell_would_fail_on_stops_the_run_before_any_job(tmp_path, capsys, isolated,
                                                                             tokenizer_dir, case, message):
    path = tmp_path / "m"
    torch.manual_seed(0)
    if case == "vocabulary":
        T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=512)).save_pretrained(path)
    else:
        MAMBA2().save_pretrained(path)
    T.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    suite = SUITE.format(models=json.dumps([{"name": "m", "path": str(path), "context": 32}]))
    if case == "backend":  # the full method: no LoRA to refuse first
        suite = suite.replace("[lora]", "[full]")
    else:
        suite = suite.replace("[full, {sliding_window: {window: 16}}]", "[full]")
    (tmp_path / "s.yaml").write_text(suite)
    code = main(["run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")])
    out = "".join(capsys.readouterr())
    assert code == 2 and f"error: {tmp_path / 's.yaml'}: line 2: {message}" in out, out  # the entry's line
    assert not (tmp_path / "out" / results.RESULTS_FILE).exists()


def test_the_fingerprint_follows_the_weights_not_the_name(tmp_path, isolated, tokenizer_dir):
    write_mamba_ssm(tmp_path / "a", sharded=False)
    fields = {"name": "m", "tokenizer": str(tokenizer_dir), "context": 32}
    a = resolve(Checkpoint(path=str(tmp_path / "a"), **fields))
    assert resolve(Checkpoint(path=str(tmp_path / "a"), **{**fields, "name": "other"})).fingerprint == a.fingerprint
    state = torch.load(tmp_path / "a" / "pytorch_model.bin", weights_only=True)
    state["backbone.norm_f.weight"] += 1  # same shapes, same sizes, other weights
    torch.save(state, tmp_path / "a" / "pytorch_model.bin")
    b = resolve(Checkpoint(path=str(tmp_path / "a"), **fields))
    assert b.fingerprint != a.fingerprint
    assert resolve(Checkpoint(path=str(tmp_path / "a"), **{**fields, "context": 64})).fingerprint != a.fingerprint
    generation = tmp_path / "a" / "generation_config.json"  # generate() merges it into RULER's decoding
    generation.write_text('{"repetition_penalty": 1.0}')
    c = resolve(Checkpoint(path=str(tmp_path / "a"), **fields))
    generation.write_text('{"repetition_penalty": 100.0}')
    assert len({b.fingerprint, c.fingerprint, resolve(Checkpoint(path=str(tmp_path / "a"), **fields)).fingerprint}) == 3


def test_suite_models_accept_presets_named_checkpoints_and_mappings(tmp_path):
    from harness.suite import load_suite

    (tmp_path / "s.yaml").write_text(textwrap.dedent("""\
        name: s
        models: [tiny-hybrid, mamba2attn-2.7b, {name: mine, path: /ckpt}]
        """))
    models = load_suite(tmp_path / "s.yaml").models
    assert models[0] == "tiny-hybrid"
    assert models[1].path == "state-spaces/mamba2attn-2.7b" and models[1].context == 2048
    assert models[2] == Checkpoint(name="mine", path="/ckpt")
    for bad, message in (("[tiny-hybrd]", "did you mean 'tiny-hybrid'"),
                         ("[{name: a/b, path: x}]", "a model name is part of every cell id"),
                         ("[{name: x, path: y, formt: hf}]", "unknown field"),
                         ("[tiny-hybrid, {name: tiny-hybrid, path: y}]", "each value may appear once")):
        (tmp_path / "s.yaml").write_text(f"name: s\nmodels: {bad}\n")
        with pytest.raises(UserError, match=message):
            load_suite(tmp_path / "s.yaml")


def test_the_paper_suite_dry_runs_without_its_checkpoint_and_data(tmp_path, capsys, isolated, monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    paper = Path(__file__).resolve().parents[1] / "suites" / "paper.yaml"
    code = main(["run", str(paper), "--dry-run", "--out", str(tmp_path / "out")])
    out = "".join(capsys.readouterr())
    assert code == 2 and "error: missing on this machine: data.eval, data.train, model (said above)" in out, out
    assert "missing model: models.mamba2attn-2.7b.path: state-spaces/mamba2attn-2.7b is not a directory" in out
    assert "`hf download state-spaces/mamba2attn-2.7b`" in out
    assert "missing data.train: PG-19 location not set" in out and "missing data.eval:" in out
    cells = [line.split()[1] for line in out.splitlines() if line.startswith("  todo ")]
    variants = 1 + 2 * 4  # pretrained + {lora_plus, hylora} x {full, sliding window, s2, se_attn (chunk from a set)}
    assert len(cells) == variants * (4 + 11 * 8) + 2 * 4  # ppl at 4 lengths, RULER 11 x 8, a train cell per fine-tune
    assert "mamba2attn-2.7b/seed0/hylora/se_attn(chunk_size=2048/4096,block_size=32,top_k=8)/ppl@32768" in cells


def test_lm_eval_runs_on_a_checkpoint_with_its_tokenizer(tmp_path, capsys, isolated, tokenizer_dir):
    from pathlib import Path

    tasks = Path(__file__).parent / "data" / "lm_eval"
    model = entry(tmp_path, "llama", tokenizer_dir)
    (tmp_path / "s.yaml").write_text(f"name: ckpt\nmodels: [{json.dumps(model)}]\nmethods: []\nmetrics:\n"
                                     f"  lm_eval: {{tasks: [harness_mc], limit: 4, include_path: {tasks}}}\n")
    code = main(["run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    (rec,) = results.current(results.load(tmp_path / "out"))
    assert rec.cell == "llama/seed0/pretrained/lm_eval/harness_mc" and rec.status == "ok", rec.error
    assert 0 <= rec.values["acc"] <= 1 and rec.model["name"] == "llama"


@pytest.mark.parametrize("method", ["lora", "hylora"])
def test_export_gives_what_peft_and_from_pretrained_load(tmp_path, capsys, isolated, tokenizer_dir, method):
    from peft import PeftModel

    from harness import artefacts
    from harness.plan import documents
    from harness.suite import load_suite

    model = entry(tmp_path, "bamba", tokenizer_dir)
    (tmp_path / "s.yaml").write_text(SUITE.format(models=json.dumps([model])).replace("[lora]", f"[{method}]"))
    code = main(["run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"), "--only", "*/train"])
    assert code == 0, "".join(capsys.readouterr())
    suite = load_suite(tmp_path / "s.yaml")
    variant = f"bamba/seed0/{method}/full"
    tuned, _ = artefacts.finetuned(suite, suite.models[0], 0, method, suite.backends[0], documents(suite, "train"))
    ids = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tuned(ids).logits
    assert main(["export", str(tmp_path / "out"), variant, str(tmp_path / "exp")]) == 0
    base = T.AutoModelForCausalLM.from_pretrained(tmp_path / "exp" / "base")
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, tmp_path / "exp" / "adapter").eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert main(["export", str(tmp_path / "out"), variant, str(tmp_path / "merged"), "--merge"]) == 0
    with torch.no_grad():
        merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-4)
    assert T.AutoTokenizer.from_pretrained(tmp_path / "merged").vocab_size == V
    capsys.readouterr()
    assert main(["export", str(tmp_path / "out"), "bamba/seed0/nope/full", str(tmp_path / "x")]) == 2
    assert f"no fine-tuned variant 'bamba/seed0/nope/full'; fix: name one of {variant}" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["bamba", "mamba_ssm"])
def test_a_variant_fine_tuned_on_cuda_is_exported_in_its_compute_dtype(tmp_path, capsys, isolated, tokenizer_dir,
                                                                       kind):
    """Exported on a CPU (a login node, say), a variant fine-tuned on a GPU keeps the precision it ran in: bf16
    weights with the SSM parameters in fp32, not an fp32 copy twice the size. The adapter's builder decides, not
    the job that recorded it from a shared cache."""
    from safetensors import safe_open

    model = entry(tmp_path, kind, tokenizer_dir)
    (tmp_path / "s.yaml").write_text(SUITE.format(models=json.dumps([model])))
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "s.yaml"), "--out", str(out), "--only", "*/lora/full/train"]) == 0
    recorded = [json.loads(line) for line in (out / results.RESULTS_FILE).read_text().splitlines()]

    def exported(trained_on, recorded_on, name):
        for rec in recorded:
            rec["model"]["trained_on"], rec["env"]["device"] = trained_on, recorded_on
        (out / results.RESULTS_FILE).write_text("".join(json.dumps(rec) + "\n" for rec in recorded))
        assert main(["export", str(out), f"{model['name']}/seed0/lora/full", str(tmp_path / name)]) == 0
        with safe_open(str(tmp_path / name / "base" / "model.safetensors"), "pt") as f:
            dtypes = {}
            for key in f.keys():
                dtypes.setdefault(key.rsplit(".", 1)[-1], set()).add(f.get_slice(key).get_dtype())
        assert {k: dtypes.pop(k) for k in ("A_log", "D", "dt_bias")} == {k: {"F32"} for k in ("A_log", "D", "dt_bias")}
        return set().union(*dtypes.values())

    assert exported("cuda: NVIDIA H100 80GB HBM3", "cpu", "exp") == {"BF16"}  # built on a GPU, recorded on a CPU
    assert exported("cpu: Intel(R) Xeon(R) Processor, 2 thread(s)", "cuda", "cpu-built") == {"F32"}
    assert exported(None, "cuda", "older") == {"BF16"}  # an adapter built before its meta named the machine
    assert main(["export", str(out), f"{model['name']}/seed0/lora/full", str(tmp_path / "merged"), "--merge"]) == 0
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.get_input_embeddings().weight.dtype == torch.bfloat16


def test_export_names_one_variant_or_says_which_match(tmp_path):
    from harness.export import _variant_info

    tuned = [("m/seed0/lora/full", "a1"), ("m/seed0/lora/se_attn", "a2"), ("m/seed0/hylora/full", "a3"),
             ("m/seed0/lora_plus/full", "a4")]  # m/seed0/lora is not a prefix of lora_plus's
    for variant, adapter in tuned:
        for cell in (f"{variant}/train", f"{variant}/ruler/niah_single_1@512"):
            results.append(tmp_path, results.Record(suite="s", cell=cell, metric=cell.split("/")[4], values={},
                                                    config_hash="h", model={"adapter": adapter}))
    assert _variant_info(tmp_path, "m/seed0/lora/se_attn/")["adapter"] == "a2"
    assert _variant_info(tmp_path, "m/seed0/hylora")["adapter"] == "a3"  # a prefix that only one variant has
    with pytest.raises(UserError, match="2 fine-tuned variants match 'm/seed0/lora'; fix: name one of "
                                        "m/seed0/lora/full, m/seed0/lora/se_attn"):
        _variant_info(tmp_path, "m/seed0/lora")
    with pytest.raises(UserError, match="no fine-tuned variant 'm/seed0/full'; fix: name one of m/seed0/hylora/full, "):
        _variant_info(tmp_path, "m/seed0/full")


def test_hf_weights_that_do_not_match_their_config_are_listed(tmp_path, isolated, tokenizer_dir):
    from safetensors.torch import load_file, save_file

    write_hf(tmp_path / "llama", "llama", tokenizer_dir)
    weights = tmp_path / "llama" / "model.safetensors"
    state = load_file(str(weights))
    del state["model.norm.weight"]
    save_file({**state, "model.extra.weight": torch.zeros(2)}, str(weights), metadata={"format": "pt"})
    r = resolve(Checkpoint(name="m", path=str(tmp_path / "llama")))
    with pytest.raises(UserError, match=r"models.m: the weights in .* do not match its config.json: "
                                        r"missing keys \(1\): model.norm.weight; unexpected keys \(1\): model.extra"):
        load_model(r)


def test_an_hf_checkpoint_in_bf16_keeps_its_ssm_parameters_in_fp32(tmp_path, isolated, tokenizer_dir, monkeypatch):
    import harness.models.sources as sources

    write_hf(tmp_path / "bamba", "bamba", tokenizer_dir)
    monkeypatch.setattr(sources, "compute_dtype", lambda entry: torch.bfloat16)  # what CUDA machines get
    model = load_model(resolve(Checkpoint(name="m", path=str(tmp_path / "bamba"))))
    dtypes = {n.rsplit(".", 1)[-1]: p.dtype for n, p in model.named_parameters()}
    assert {dtypes[k] for k in ("A_log", "D", "dt_bias")} == {torch.float32} and dtypes["weight"] == torch.bfloat16


def test_a_backend_needs_attention_that_goes_through_the_interface():
    from harness.artefacts import use_attention
    from harness.suite import expand_backend

    mamba = MAMBA2()
    (full,), (window,) = expand_backend("full", "b"), expand_backend({"sliding_window": {"window": 16}}, "b")
    assert use_attention(mamba, full, "finetune") == "native"
    with pytest.raises(UserError, match=r"backend sliding_window\(window=16\): Mamba2ForCausalLM \(mamba2\) has no "
                                        "attention that goes through transformers' AttentionInterface"):
        use_attention(mamba, window, "finetune")
    llama = HF["llama"]()
    assert use_attention(llama, window, "finetune").startswith("harness_sliding_window_")


def test_attention_dropout_in_training_names_the_config_field_to_zero():
    import transformers

    from harness.artefacts import use_attention
    from harness.suite import expand_backend

    (full,) = expand_backend("full", "b")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1,
                                                                n_head=2))  # attn_pdrop 0.1, as GPT-2 ships
    use_attention(gpt2, full, "finetune")
    x = torch.randint(0, 64, (1, 8))
    with pytest.raises(UserError, match=r"does not implement attention dropout \(got dropout=0.1\); set the model's "
                                        r"attention dropout to 0 \(attn_pdrop in its config.json\)"):
        gpt2.train()(input_ids=x)
    gpt2.eval()(input_ids=x)  # evaluation applies no dropout


@pytest.mark.parametrize("method", ["hylora", "full"])
def test_export_writes_a_base_and_its_adapter_or_one_model(tmp_path, monkeypatch, tokenizer_dir, method):
    """export's files without a run (the run's records, the cache and the base are stood in for): a method with an
    adapter as base/ (the fully trained tensors in place, the tokenizer) and adapter/ (both of PEFT's files, its
    base_model_name_or_path at base/); `full`, which has none, as one model directory. An empty OUT_DIR is fine."""
    from peft import PeftModel

    from harness import cache, export
    from harness.finetune.methods import apply_method, save_method

    def base():
        torch.manual_seed(0)
        return HybridForCausalLM(HybridConfig(**MAMBA_SSM))

    tuned, _ = apply_method(base(), method, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.requires_grad and "lora_A" not in name:
                p.add_(torch.randn_like(p) * 0.1)
    save_method(tuned, tmp_path / "adapter")
    monkeypatch.setattr(export, "_variant_info", lambda run_dir, variant: {"adapter": "a"})
    monkeypatch.setattr(cache, "lookup", lambda kind, key: tmp_path / "adapter")
    monkeypatch.setattr(export, "_base", lambda info: (base(), T.AutoTokenizer.from_pretrained(tokenizer_dir)))
    out = tmp_path / "exp"
    out.mkdir()
    assert export.export(tmp_path / "run", "m/seed0/v/full", out) == out
    ids = torch.randint(0, V, (1, 24), generator=torch.Generator().manual_seed(0))
    if method == "full":
        assert not (out / "adapter").exists() and not (out / "base").exists()
        model, tokenizer = T.AutoModelForCausalLM.from_pretrained(out), out
    else:
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str((out / "base").resolve())
        model = PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(out / "base"), out / "adapter")
        tokenizer = out / "base"
    assert T.AutoTokenizer.from_pretrained(tokenizer).vocab_size == V
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, tuned.eval()(ids).logits, rtol=0, atol=0)
    with pytest.raises(UserError, match="exists and is not empty"):
        export.export(tmp_path / "run", "m/seed0/v/full", out)


def test_export_refuses_a_checkpoint_whose_files_changed_since_the_run(tmp_path, isolated, tokenizer_dir):
    from harness.export import _base

    write_mamba_ssm(tmp_path / "m", sharded=False)
    info = resolve(Checkpoint(name="m", path=str(tmp_path / "m"), tokenizer=str(tokenizer_dir), context=32)).info()
    assert isinstance(_base(info)[0], HybridForCausalLM)
    state = torch.load(tmp_path / "m" / "pytorch_model.bin", weights_only=True)
    state["backbone.norm_f.weight"] += 1
    torch.save(state, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(UserError, match="checkpoint m at .* is not the one the run measured"):
        _base(info)


def test_the_fingerprint_covers_every_shard_the_config_the_tokenizer_and_the_dtype(tmp_path, isolated,
                                                                                    tokenizer_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    path, tok = tmp_path / "a", tmp_path / "tok"
    write_mamba_ssm(path, sharded=True)
    shutil.copytree(tokenizer_dir, tok)
    fields = {"name": "m", "path": str(path), "tokenizer": str(tok), "context": 32}

    def fingerprint(**changed):
        return resolve(Checkpoint(**{**fields, **changed})).fingerprint

    seen = [fingerprint()]

    def differs(what, **changed):
        seen.append(fingerprint(**changed))
        assert seen[-1] not in seen[:-1], what

    (path / "training_args.bin").write_bytes(b"a trainer's arguments, not weights")
    assert fingerprint() == seen[0]
    differs("dtype", dtype="float32")
    shard = path / "model-00002-of-00002.safetensors"
    save_file({k: v + 1 for k, v in load_file(shard).items()}, str(shard))
    differs("second shard")
    (path / "config.json").write_text(json.dumps({**MAMBA_SSM, "norm_epsilon": 1e-6}))
    differs("config.json")
    tokenizer_json = tok / "tokenizer.json"
    tokenizer_json.write_text(json.dumps(json.loads(tokenizer_json.read_text()), indent=1))
    differs("tokenizer.json")


def test_the_position_limit_is_the_shortest_table_and_the_vocabulary_may_fill_the_embeddings():
    from types import SimpleNamespace

    from harness.models.sources import check_vocabulary, position_limit

    emb = torch.nn.Embedding
    two = torch.nn.ModuleDict({"wpe": emb(48, 4), "decoder": torch.nn.ModuleDict({"embed_positions": emb(40, 4)}),
                               "embed_tokens": emb(V, 4)})
    assert position_limit(two) == 40
    r, llama = SimpleNamespace(entry=SimpleNamespace(name="m")), HF["llama"]()
    check_vocabulary(r, range(V), llama)  # as many tokens as embeddings
    with pytest.raises(UserError, match=f"the tokenizer has {V + 1} tokens, more than the model's {V} embeddings"):
        check_vocabulary(r, range(V + 1), llama)
