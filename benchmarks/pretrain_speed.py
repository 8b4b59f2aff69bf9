"""Where a pretraining step of the embedded default goes, and how fast it is beside transformers' own models.

1. Profile: one training step of tiny-hybrid at the pretraining shape (batch 8, context 512, AdamW), and each of
   its parts on its own, forward + backward with random inputs of the shape it sees in the model: the LM head
   with the loss, a Mamba-2 layer cut into in_proj / conv / SSD scan / gated norm + out_proj, an attention
   layer, the optimizer step. Measured alone, the parts do not add up to the step exactly: what they leave out
   (embedding, residual adds and block norms, Python) is smaller than what each loses alone to cold caches.
2. Throughput: training tokens/s (forward, backward, AdamW step) of tiny-hybrid, a Llama and a Bamba built by
   transformers with the same width, depth, vocabulary and about the same parameter count, at the same shape.

Median seconds over `--repeats` after `--warmup` untimed calls, on however many threads torch uses.

    python benchmarks/pretrain_speed.py [--repeats 5] [--warmup 2] [--batch 8] [--context 512] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import transformers as T

from harness.data import default_tokenizer
from harness.finetune.loop import lm_loss, weighted_lm_loss
from harness.models import HybridForCausalLM, preset_config
from harness.models.attention import Attention
from harness.models.conv import causal_conv
from harness.models.mamba2 import Mamba2
from harness.models.ssd import ssd_chunked


def median_s(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_step(model: torch.nn.Module, ids: torch.Tensor, compile: bool = False):
    """A training step with the pretraining optimizer (AdamW, its betas and weight decay) and the loop's LM loss
    (logits of all but the last position), compiled as the loop compiles it with `compile`; the loop's gradient
    clipping and the recall rows' loss weights are left out (together about 1 ms here)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    loss_of = torch.compile(lm_loss) if compile else lm_loss

    def step():
        loss_of(model, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


def fwd_bwd(fn, *inputs: torch.Tensor):
    """A call of `fn(*inputs)` and the backward of its output's sum; the inputs are leaves that need grad."""
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]

    def run():
        out = fn(*leaves)
        (out if out.dim() == 0 else out.float().sum()).backward()

    return run


def hybrid(vocab: int) -> HybridForCausalLM:
    config = preset_config("tiny-hybrid")
    config.vocab_size = vocab
    torch.manual_seed(0)
    return HybridForCausalLM(config)


def profile(args, vocab: int) -> None:
    model = hybrid(vocab).train()
    cfg = model.config
    b, l, d = args.batch, args.context, cfg.d_model
    ids = torch.randint(0, vocab, (b, l))
    step, opt = train_step(model, ids)
    whole = median_s(step, args.repeats, args.warmup)

    mamba = next(m for m in model.modules() if isinstance(m, Mamba2))
    attn = next(m for m in model.modules() if isinstance(m, Attention))
    n_mamba = sum(isinstance(m, Mamba2) for m in model.modules())
    n_attn = sum(isinstance(m, Attention) for m in model.modules())
    h, p, n = mamba.nheads, mamba.headdim, mamba.d_state
    u = torch.randn(b, l, d)
    conv_dim = mamba.conv1d.in_channels
    parts = {
        "lm head + loss": (1, fwd_bwd(lambda x: weighted_lm_loss(model.lm_head(x[:, :-1]), ids), u)),
        "mamba in_proj": (n_mamba, fwd_bwd(mamba.in_proj, u)),
        "mamba conv1d": (n_mamba, fwd_bwd(lambda x: causal_conv(x, mamba.conv1d, "silu"),
                                          torch.randn(b, l, conv_dim).transpose(1, 2))),  # as the mixer passes it
        "mamba SSD scan": (n_mamba, fwd_bwd(
            lambda x, dt, B, C: ssd_chunked(x, F.softplus(dt), -torch.exp(mamba.A_log.float()), B, C,
                                            mamba.chunk_size, mamba.D),
            torch.randn(b, l, h, p), torch.randn(b, l, h), torch.randn(b, l, 1, n), torch.randn(b, l, 1, n))),
        "mamba norm + out_proj": (n_mamba, fwd_bwd(lambda y, z: mamba.out_proj(mamba.norm(y, z)),
                                                   torch.randn(b, l, mamba.d_inner), torch.randn(b, l, mamba.d_inner))),
        "attention layer": (n_attn, fwd_bwd(attn, u)),
    }
    timed = {name: count * median_s(run, args.repeats, args.warmup) for name, (count, run) in parts.items()}
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    timed["AdamW step"] = median_s(lambda: opt.step(), args.repeats, args.warmup)
    print(f"tiny-hybrid pretraining step, batch {b} x context {l} ({b * l} tokens): {whole * 1e3:.0f} ms, "
          f"{b * l / whole:,.0f} tokens/s, {torch.get_num_threads()} threads")
    for name, s in timed.items():
        count = parts[name][0] if name in parts else 1
        each = f" ({count} layers)" if count > 1 else ""
        print(f"  {name + each:<32} {s * 1e3:8.1f} ms  {100 * s / whole:5.1f}%")
    total = sum(timed.values())
    print(f"  {'parts, each measured alone':<32} {total * 1e3:8.1f} ms  {100 * total / whole:5.1f}%")


def llama(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=vocab, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=64, max_position_embeddings=4096, tie_word_embeddings=True))


def bamba(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return T.BambaForCausalLM(T.BambaConfig(
        vocab_size=vocab, hidden_size=128, num_hidden_layers=4, attn_layer_indices=[1, 3], num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=16, mamba_n_heads=8, mamba_d_head=32, mamba_d_state=32,
        mamba_n_groups=1, mamba_expand=2, mamba_chunk_size=64, tie_word_embeddings=True))


def throughput(args, vocab: int) -> None:
    ids = torch.randint(0, vocab, (args.batch, args.context))
    print(f"training tokens/s, batch {args.batch} x context {args.context}, forward + backward + AdamW:")
    builders = {"tiny-hybrid (harness)": hybrid, "Llama (transformers)": llama, "Bamba (transformers)": bamba}
    for name, build in builders.items():
        model = build(vocab).train()
        params = sum(p.numel() for p in model.parameters())
        step, _ = train_step(model, ids, args.compile)
        s = median_s(step, args.repeats, args.warmup)
        print(f"  {name:<24} {params / 1e6:5.2f}M params  {s * 1e3:7.0f} ms/step  {ids.numel() / s:8,.0f} tokens/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile each model's loss (as pretrain.compile does) for the throughput table")
    args = ap.parse_args()
    vocab = len(default_tokenizer())
    profile(args, vocab)
    throughput(args, vocab)


if __name__ == "__main__":
    main()
