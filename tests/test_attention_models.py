"""Attention backends inside models: registered as transformers attention implementations in the hybrid LM
and in a Llama, forward+backward, equal to their reference kernels, kernels recorded, checkpoint-safe."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from harness.attention import recording, register, registered_backend
from harness.finetune.loop import checkpoint_activations
from harness.models import HybridConfig, HybridForCausalLM
from harness.models.cache_args import output_cache

BACKENDS = [
    ("full", {}),
    ("sliding_window", {"window": 7}),
    ("s2_attn", {}),
    ("se_attn", {"chunk_size": 8, "block_size": 4, "top_k": 2}),
    ("se_attn_random", {"chunk_size": 8, "block_size": 2, "top_k": 2, "per_head": False}),
    ("se_attn_nomem", {"chunk_size": 8, "block_size": 4}),
]


def _config():
    return HybridConfig(
        d_model=64, n_layer=3, d_intermediate=0, vocab_size=101, attn_layer_idx=[1],
        ssm_cfg={"d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8},
        attn_cfg={"num_heads": 4, "num_heads_kv": 2, "head_dim": 16, "rotary_emb_dim": 8, "d_conv": 4},
    )


def _model(attn):
    torch.manual_seed(0)
    return HybridForCausalLM.from_config(_config(), attn_implementation=attn)


IDS = torch.randint(0, 101, (2, 37), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("backend,options", BACKENDS, ids=[b for b, _ in BACKENDS])
def test_hybrid_model_with_backend_equals_its_reference_kernel(backend, options):
    name = register(backend, **options)
    assert register(backend, **options) == name  # idempotent, deterministic
    model, ref = _model(name).eval(), _model(register(backend, kernel="reference", **options)).eval()
    assert model.config._attn_implementation == name
    with torch.no_grad(), recording() as kernels:
        out = model(IDS).logits
    canonical = registered_backend(name).name
    merges = backend in ("sliding_window", "se_attn", "se_attn_random", "se_attn_nomem")  # merge.py's calls
    merged = {"merge via cpu_flash"} if merges else set()
    assert kernels == {f"{canonical} via {'sdpa' if canonical == 'full' else 'blockwise'}"} | merged
    with torch.no_grad():
        torch.testing.assert_close(out, ref(IDS).logits, atol=1e-5, rtol=1e-5)
        if backend == "full":
            torch.testing.assert_close(out, _model("sdpa").eval()(IDS).logits, atol=1e-5, rtol=1e-5)
    model.train()
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_set_attn_implementation_switches_backend_and_decode_is_reported():
    model = _model("sdpa").eval()
    name = register("se_attn", chunk_size=8, block_size=4, top_k=2)
    model.set_attn_implementation(name)
    assert model.config._attn_implementation == name
    with torch.no_grad(), recording() as kernels:
        out = model(IDS[:, :20], use_cache=True)
        model(IDS[:, 20:23], past_key_values=output_cache(out), use_cache=True)
    assert kernels == {"se_attn via blockwise", "merge via cpu_flash", "full via sdpa (decode)"}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("in_loop", [False, True])  # seeds from the training loop's place (training_call), or not
def test_random_chunk_size_is_consistent_under_gradient_checkpointing(reentrant, in_loop):
    from contextlib import nullcontext

    from harness.attention.backend import training_call

    name = register("se_attn", chunk_size=[4, 8, 16], block_size=2, top_k=2, seed=3)
    grads = []
    for checkpointing in (False, True):
        registered_backend(name).reset()
        model = _model(name).train()
        if checkpointing:
            checkpoint_activations(model, use_reentrant=reentrant)
        for step in range(2):  # two steps: the chunk size is drawn anew per call
            with training_call(step, 0) if in_loop else nullcontext():
                model(IDS, labels=IDS).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_llama_with_se_attn_forward_backward_and_reference():
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    options = {"chunk_size": 8, "block_size": 4, "top_k": 2}

    def llama(attn):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        model.set_attn_implementation(attn)
        return model

    model = llama(register("se_attn", **options))
    with recording() as kernels:
        loss = model(IDS, labels=IDS).loss
        loss.backward()
    assert kernels == {"se_attn via blockwise", "merge via cpu_flash"}
    assert all(p.grad is not None for p in model.parameters())
    ref = llama(register("se_attn", kernel="reference", **options)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS).logits, ref(IDS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("asked", [{"softcap": 50.0}, {"s_aux": torch.zeros(2)}, {"position_bias": torch.zeros(1)},
                                   {"is_causal": False}])
def test_attention_a_backend_does_not_implement_is_an_error_not_dropped(asked):
    from transformers import AttentionInterface

    from harness.errors import UserError

    q = torch.randn(1, 2, 8, 4)
    attention = AttentionInterface()[register("full")]
    attention(torch.nn.Module(), q, q, q, None, softcap=None, s_aux=None, is_causal=True)  # None: not asked
    with pytest.raises(UserError, match=f"Module asks for .*\\({next(iter(asked))}=.*own attention only"):
        attention(torch.nn.Module(), q, q, q, None, **asked)


def test_a_soft_capped_model_refuses_a_harness_backend():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from harness.errors import UserError

    cfg = Gemma2Config(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, attn_logit_softcapping=0.5)
    model = Gemma2ForCausalLM(cfg).eval()
    model.set_attn_implementation(register("full"))
    with torch.no_grad(), pytest.raises(UserError, match="Gemma2Attention asks for logit soft-capping"):
        model(IDS)


def test_the_attention_function_takes_the_models_scaling_and_training_mode():
    from transformers import AttentionInterface

    from harness.attention import attend

    q, k, v = (torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(s)) for s in range(3))
    full = AttentionInterface()[register("full")]
    out, _ = full(torch.nn.Module(), q, k, v, None, scaling=0.5)
    torch.testing.assert_close(out, attend(q, k, v, scale=0.5).transpose(1, 2))
    random = AttentionInterface()[register("se_attn_random", chunk_size=4, block_size=2, top_k=1, seed=9)]
    module = torch.nn.Module()
    for training, differ in ((False, False), (True, True)):  # training: random blocks drawn anew per call
        module.train(training)
        outs = [random(module, q, k, v, None)[0] for _ in range(3)]
        assert any(not torch.equal(outs[0], o) for o in outs[1:]) == differ
