"""A record's code fingerprint covers the modules behind its metric, and only those."""

import shutil
from pathlib import Path

import harness
from harness import cache, provenance


def test_editing_a_metric_module_changes_that_metric_only(tmp_path, monkeypatch):
    tree = tmp_path / "harness"
    shutil.copytree(Path(harness.__file__).parent, tree, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "_ROOT", tree)
    provenance.fingerprint.cache_clear()
    metrics = ("pretrain", "train", "perplexity", "ruler", "lm_eval", "efficiency")
    before = {m: provenance.fingerprint(m) for m in metrics}
    with open(tree / "metrics" / "perplexity.py", "a") as f:
        f.write("\n# a fix\n")
    provenance.fingerprint.cache_clear()
    after = {m: provenance.fingerprint(m) for m in metrics}
    assert [m for m in before if before[m] != after[m]] == ["perplexity"]
    with open(tree / "models" / "ssd.py", "a") as f:  # the model: every cell of a model variant
        f.write("\n# a fix\n")
    provenance.fingerprint.cache_clear()
    now = {m: provenance.fingerprint(m) for m in metrics}
    assert {m for m in metrics if now[m] != after[m]} == {"pretrain", "train", "perplexity", "ruler", "lm_eval"}
    with open(tree / "attention" / "bench.py", "a") as f:  # timing one layer: efficiency only
        f.write("\n# a fix\n")
    provenance.fingerprint.cache_clear()
    assert {m for m in metrics if provenance.fingerprint(m) != now[m]} == {"efficiency"}
    provenance.fingerprint.cache_clear()
    now = {m: provenance.fingerprint(m) for m in metrics}
    with open(tree / "data" / "tokenizer.py", "a") as f:  # the embedded tokenizer: every model variant's cells
        f.write("\n# a fix\n")
    provenance.fingerprint.cache_clear()
    assert {m for m in metrics if provenance.fingerprint(m) != now[m]} == {"pretrain", "train", "perplexity",
                                                                          "ruler", "lm_eval"}
    provenance.fingerprint.cache_clear()


def test_every_listed_module_exists():
    metrics = ("pretrain", "train", "perplexity", "ruler", "lm_eval", "efficiency")
    for modules in [*map(provenance.modules, metrics), provenance.PRETRAINED, provenance.ADAPTER]:
        for name in modules:
            assert all(f.is_file() for f in provenance._files(name)) and provenance._files(name), name


def test_cache_keys_skip_code_that_builds_nothing(tmp_path, monkeypatch):
    tree = tmp_path / "harness"
    shutil.copytree(Path(harness.__file__).parent, tree, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "_ROOT", tree)

    def keys():
        return tuple(provenance.artefact_fingerprint(m) for m in (provenance.PRETRAINED, provenance.ADAPTER))

    before = keys()
    for name in ("models/checkpoint.py", "attention/bench.py", "metrics/perplexity.py"):
        with open(tree / name, "a") as f:
            f.write("\n# an edit\n")
    assert keys() == before
    with open(tree / "attention" / "blockwise.py", "a") as f:
        f.write("\n# an edit\n")
    assert keys()[0] == before[0] and keys()[1] != before[1]
    with open(tree / "data" / "tokens.py", "a") as f:
        f.write("\n# an edit\n")
    assert keys()[0] != before[0]
    now = keys()
    with open(tree / "pretraining.py", "a") as f:  # how a preset is pretrained: seed, init, batches
        f.write("\n# an edit\n")
    assert keys()[0] != now[0] and keys()[1] != now[1]
    now = keys()
    with open(tree / "artefacts.py", "a") as f:  # what to build, and the fine-tune: adapters only
        f.write("\n# an edit\n")
    assert keys()[0] == now[0] and keys()[1] != now[1]


def test_code_names_version_commit_and_fingerprint():
    code = provenance.code("ruler")
    assert code == {"version": harness.__version__, "git": code["git"], "fingerprint": provenance.fingerprint("ruler")}
    assert code["git"] is None or len(code["git"]) >= 7


def test_every_module_that_builds_an_artefact_is_in_its_key(tmp_path, monkeypatch):
    """An edit to any module under PRETRAINED or ADAPTER (subpackages included) moves that key, and so does code
    moved from one file to another: a key that missed one would serve a model built by other code."""
    tree = tmp_path / "harness"
    shutil.copytree(Path(harness.__file__).parent, tree, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "_ROOT", tree)

    def files(modules: tuple[str, ...]) -> set[Path]:
        found = set()
        for m in modules:
            path = tree.joinpath(*m.split(".")[1:])
            found |= {path.with_suffix(".py")} if path.with_suffix(".py").is_file() else set(path.rglob("*.py"))
        return found

    needed = {provenance.PRETRAINED: ("finetune/loop.py", "models/ssd.py", "pretraining.py"),  # the loop it runs
              provenance.ADAPTER: ("attention/backends/se_attn.py", "finetune/methods.py")}  # subpackages too
    for modules in (provenance.PRETRAINED, provenance.ADAPTER):
        building = sorted(files(modules) - files(provenance._NOT_BUILDING))
        assert {tree / f for f in needed[modules]} <= set(building)
        for f in building:
            before = provenance.artefact_fingerprint(modules)
            with open(f, "a") as out:
                out.write("\n# an edit\n")
            assert provenance.artefact_fingerprint(modules) != before, f
        a, b = cache.module_files(tree.joinpath(*modules[0].split(".")[1:], "__init__.py"))[:2]  # hashed in turn
        before = provenance.artefact_fingerprint(modules)
        a.write_text(a.read_text() + b.read_text()), b.write_text("")  # the same code, in another file
        assert provenance.artefact_fingerprint(modules) != before


def test_code_takes_the_commit_from_git(monkeypatch):
    from harness import results

    monkeypatch.setattr(results, "git_revision", lambda: "abc1234")
    assert provenance.code("perplexity")["git"] == "abc1234"
