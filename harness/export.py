"""`harness export RUN_DIR VARIANT OUT_DIR [--merge]`: a fine-tuned variant of a run as files others load.

    OUT_DIR/base/      the base model with the method's fully trained tensors (embeddings, norms, conv1d) in
                       place, and its tokenizer: `from_pretrained` loads it
    OUT_DIR/adapter/   the LoRA adapter in PEFT's format, its base_model_name_or_path pointing at OUT_DIR/base

so `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT/base), OUT/adapter)` is the variant, as is
lm-eval's `--model hf --model_args pretrained=OUT/base,peft=OUT/adapter`. With --merge, OUT_DIR is one model
directory with the adapter folded in (refused where an adapter updates a weight tied to another module's). The
variant comes from the run's records (which adapter, which base) and the artefact cache. Presets and mamba_ssm
checkpoints are saved as this package's model type (`import harness.models` registers it with transformers'
Auto classes, so lm-eval must run in a process that imported it: README); HF checkpoints keep their own. A
checkpoint is saved in the precision its variant was fine-tuned in: its `dtype` where that ran on CUDA (A_log, D
and dt_bias in float32), float32 where it ran on a CPU, whichever machine exports it.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

from harness import cache, results
from harness.errors import UserError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def export(run_dir: Path, variant: str, out: Path, merge: bool = False) -> Path:
    from harness.artefacts import ADAPTER
    from harness.finetune.methods import META_FILE, load_fully_trained, load_method

    info = _variant_info(run_dir, variant)
    adapter = cache.lookup(ADAPTER, info["adapter"])
    if adapter is None:
        raise UserError(f"{variant}: its adapter ({info['adapter']}) is not in the cache ({cache.cache_root()}); "
                        f"rerun the suite into {run_dir} to rebuild it")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; fix: choose a new directory")
    model, tokenizer = _base(info)
    peft = json.loads((adapter / META_FILE).read_text())["peft"]
    if merge or not peft:
        try:
            merged(load_method(model, adapter)).save_pretrained(out)
        except UserError as e:
            raise UserError(f"{variant}: {e}") from None
        tokenizer.save_pretrained(out)
        return out
    load_fully_trained(model, adapter).save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    (out / "adapter").mkdir()
    for name in ADAPTER_FILES:
        shutil.copy(adapter / name, out / "adapter" / name)
    config = json.loads((out / "adapter" / ADAPTER_FILES[0]).read_text())
    config["base_model_name_or_path"] = str((out / "base").resolve())
    (out / "adapter" / ADAPTER_FILES[0]).write_text(json.dumps(config, indent=2))
    return out


def merged(model):
    """A loaded method (`load_method`) with its LoRA weights folded into the base layers: a plain model. Refused
    where an adapted weight is tied to another module's, which no merged file can hold."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    if tied := _tied_lora_bases(model):
        raise UserError(f"{' and '.join(tied)} share one (tied) weight that an adapter updates, as in Zamba2's shared "
                        "attention block or an lm_head tied to the embedding; merged, that weight would carry the "
                        "update everywhere it is used. Fix: export without --merge (the base and its PEFT adapter)")
    return model.merge_and_unload().eval()


def _tied_lora_bases(model) -> list[str]:
    """The first LoRA-wrapped layer whose base weight is also another module's (a tied weight: Zamba2's shared
    block, an lm_head tied to the embedding), with those modules; else []."""
    from peft.tuners.lora import LoraLayer

    owners: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners[p.data_ptr()].append(name.removeprefix("base_model.model."))
    for module in model.modules():
        if isinstance(module, LoraLayer) and len(tied := owners[module.get_base_layer().weight.data_ptr()]) > 1:
            return tied
    return []


def _variant_info(run_dir: Path, variant: str) -> dict:
    """The `model` field of the variant's records: which base and which adapter."""
    if not (run_dir / results.RESULTS_FILE).is_file():
        raise UserError(f"{run_dir}: no {results.RESULTS_FILE}; fix: the results directory of a `harness run`")
    records = results.current(results.load(run_dir))
    tuned = {r.cell.rsplit("/", 1)[0]: {**r.model, "device": r.env.get("device", "cpu")} for r in records
             if r.model.get("adapter") and r.metric == "train"}
    name = variant.rstrip("/")
    found = [name] if name in tuned else [v for v in sorted(tuned) if v.startswith(name + "/")]
    if len(found) != 1:
        what = f"{len(found)} fine-tuned variants match {variant!r}" if found else f"no fine-tuned variant {variant!r}"
        raise UserError(f"{run_dir}: {what}; fix: name one of {', '.join(found or sorted(tuned)) or 'none'}")
    return tuned[found[0]]


def _base(info: dict):
    """(the base model on `device()`, its tokenizer) of a variant's records; a checkpoint must still be the one
    the run measured."""
    from harness.artefacts import PRETRAINED, device
    from harness.data import default_tokenizer
    from harness.models import HybridForCausalLM
    from harness.models.sources import Checkpoint, compute_dtype, load_model, load_tokenizer, resolve

    if "preset" in info:
        path = cache.lookup(PRETRAINED, info["hash"])
        if path is None:
            raise UserError(f"the pretrained {info['preset']} ({info['hash']}) is not in the cache; rerun the suite")
        return HybridForCausalLM.from_pretrained(path).to(device()), default_tokenizer()
    entry = Checkpoint(name=info["name"], path=info["path"], format=info["format"], tokenizer=info["tokenizer"],
                       dtype=info["dtype"], context=info["pretrain_context"])
    r = resolve(entry)
    if r.fingerprint != info["hash"]:
        raise UserError(f"checkpoint {info['name']} at {info['path']} is not the one the run measured (its files "
                        "changed); fix: export from a run on these files")
    # the precision the variant was fine-tuned in (its compute dtype on CUDA), wherever the export runs: the machine
    # that built the adapter (a job on another may record it from a shared cache), else the recording job's
    trained_on = info.get("trained_on") or info.get("device", "cpu")
    return load_model(r, compute_dtype(entry, cuda=trained_on.startswith("cuda"))).to(device()), load_tokenizer(r)
