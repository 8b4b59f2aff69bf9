"""A configured backend: picks the kernel, draws per-call randomness, handles decode, records what ran.

Kernel choice (`kernel` option): "auto" takes the fastest kernel that can run for the tensors at hand
(CUDA: flash-attn when installed for full/sliding_window/s2_attn, FlexAttention for sliding_window, SDPA
otherwise; CPU: SDPA / blockwise SDPA). Naming a kernel that cannot run is a UserError unless
`fallback=True`, in which case the "auto" choice runs; the recorded kernel string always names what ran.

Randomness (se_attn's chunk-size draws and random retrieval) comes from a per-call seed. In training under
`training_call(step, micro_batch)` (the training loop sets it), the n-th call of a micro-batch's forward takes a
seed derived from (`seed`, step, the micro-batch's index in the step over all ranks, n): the draws do not depend
on how many processes share a step, and a resumed fine-tune draws what the straight one drew. Other training
calls take the next seed from a torch.Generator seeded by `seed`. In eval the seed is `seed` itself and the
chunk size is the largest of the set, so eval is deterministic. Calls made while autograd is running a
backward pass (gradient-checkpoint recomputation) reuse the seed of the matching forward call (per module,
last in first out), so the recomputed forward sees the same chunk size and blocks.
"""

import contextlib
import hashlib
from collections import deque
from contextvars import ContextVar

import torch

from ..errors import UserError
from . import blockwise, gpu, recording
from .options import resolve, spec
from .reference import causal_mask, dense_attention

# Where training is: [step, micro-batch index over all ranks, calls drawn so far] (training_call).
_TRAINING_CALL: ContextVar[list[int] | None] = ContextVar("training_call", default=None)


@contextlib.contextmanager
def training_call(step: int, micro_batch: int):
    """The forward (and backward) of optimizer step `step`'s micro-batch `micro_batch` (counted over all ranks in
    the order the data is drawn): per-call random draws in it are a function of these (module docstring)."""
    token = _TRAINING_CALL.set([step, micro_batch, 0])
    try:
        yield
    finally:
        _TRAINING_CALL.reset(token)


def _non_finite(q, k, v) -> list[str]:
    """The names of q, k, v that hold NaN or inf. One fp32 sum per tensor and one host sync: NaN or inf anywhere
    makes the sum non-finite (isfinite would allocate a temporary the size of each); a finite tensor whose sum
    overflows is told apart by the exact test."""
    with torch.no_grad():
        if bool(torch.stack([x.sum(dtype=torch.float32) for x in (q, k, v)]).isfinite().all()):
            return []
    return [n for n, x in zip("qkv", (q, k, v), strict=True) if not bool(torch.isfinite(x).all())]


class Backend:
    def __init__(self, name: str, **options):
        self.name, self.options = resolve(name, options)
        self.spec = spec(self.name)
        self._generator = torch.Generator().manual_seed(self.options.get("seed", 0))
        self._seeds: dict[int, deque] = {}

    def reset(self) -> None:
        """Restart the per-call seed sequence (as if freshly constructed)."""
        self._generator.manual_seed(self.options.get("seed", 0))
        self._seeds.clear()

    def kernel_for(self, q: torch.Tensor, masked: bool = False) -> str:
        """The kernel that will run; `masked`: a padding mask is present (flash-attn cannot take one)."""
        def ok(kernel):
            return gpu.available(kernel, q) and not (masked and kernel == "flash")

        wanted = self.options["kernel"]
        if wanted != "auto":
            if ok(wanted):
                return wanted
            if not self.options["fallback"]:
                why = ("cannot take a padding mask (flash-attn has no mask argument): pass unpadded batches or "
                       "choose another kernel" if masked and gpu.available(wanted, q) else
                       f"is not available here (device {q.device}, dtype {q.dtype}; flash needs CUDA + flash-attn + "
                       "fp16/bf16, flex needs CUDA and a head dim of at least 16)")
                raise UserError(f"attention backend {self.name!r}: kernel {wanted!r} {why}; set the backend's option "
                                "`fallback: true` (from Python, fallback=True) to allow the automatic choice")
        return next(k for k in self.spec.auto if ok(k))

    def plan(self, training: bool, module=None) -> dict:
        """Per-call choices (se_attn: chunk size and the seed of random retrieval)."""
        if self.spec.plan is None:
            return {}
        if not training:
            return self.spec.plan(self.options, self.options.get("seed", 0), False)
        stack = self._seeds.setdefault(id(module), deque(maxlen=256))
        if torch._C._current_graph_task_id() != -1 and stack:  # recomputation inside backward
            call_seed = stack.pop()
        elif (where := _TRAINING_CALL.get()) is not None:
            digest = hashlib.sha256(f"{self.options.get('seed', 0)}/{where[0]}/{where[1]}/{where[2]}".encode())
            call_seed = int.from_bytes(digest.digest()[:8], "little") >> 2  # below 2**62, as the generator's
            where[2] += 1
            stack.append(call_seed)
        else:
            call_seed = int(torch.randint(0, 2**62, (), generator=self._generator))
            stack.append(call_seed)
        return self.spec.plan(self.options, call_seed, True)

    def __call__(self, q, k, v, scale=None, mask=None, training=False, module=None):
        """q (B, Hq, Lq, d), k/v (B, Hkv, Lk, d), Lq <= Lk; returns ((B, Hq, Lq, d), kernel string)."""
        if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] \
                or k.shape[1] == 0 or q.shape[1] % k.shape[1] or q.shape[2] > k.shape[2]:
            raise UserError(f"attention expects q (B, Hq, Lq, d) and k, v (B, Hkv, Lk, d) with Hq a multiple of Hkv "
                            f"and Lq <= Lk; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        if not (q.is_floating_point() and q.dtype == k.dtype == v.dtype):
            raise UserError(f"attention expects q, k, v of one floating-point dtype; got {q.dtype}, {k.dtype}, "
                            f"{v.dtype}")
        if bad := _non_finite(q, k, v):
            raise UserError(f"attention backend {self.name!r} got NaN or inf in {', '.join(bad)}: the model diverged "
                            "(lower the learning rate, or use bf16/fp32 instead of fp16) or its inputs hold NaN; "
                            "kernels would spread it to outputs that never attend to it")
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if mask is not None and mask.dtype != torch.bool:
            mask = mask == 0  # additive float mask: 0 where attending
        if q.shape[2] < k.shape[2]:
            if (rule := self.spec.decode_mask) is None:
                return blockwise.full_sdpa(q, k, v, scale, mask), recording.record("full via sdpa (decode)")
            own = rule(q.shape[2], k.shape[2], self.options, q.device)
            out = blockwise.full_sdpa(q, k, v, scale, own if mask is None else mask & own)
            return out, recording.record(f"{self.name} via sdpa (decode)")
        if mask is not None and not self.spec.padding_mask:
            causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()
            if not bool((mask | ~causal).all()):
                raise UserError(f"attention backend {self.name!r} got a padding attention mask; it supports "
                                "unpadded (or packed) batches only at prefill/training. Use 'full' for padded batches.")
            mask = None  # the mask is plain causal: the backend's own pattern applies
        kernel = self.kernel_for(q, masked=mask is not None)
        out = self._run(kernel, q, k, v, scale, mask, self.plan(training, module))
        return out, recording.record(f"{self.name} via {kernel}")

    def _run(self, kernel, q, k, v, scale, mask, plan):
        if kernel == "reference":
            if mask is not None:  # only a backend that takes padding masks gets here with one
                return dense_attention(q, k, v, causal_mask(q.shape[2], k.shape[2], q.device) & mask, scale)
            return dense_attention(q, k, v, self.spec.mask(q, k, v, scale, self.options, plan), scale)
        return self.spec.kernels[kernel](q, k, v, scale, self.options, plan, mask)
