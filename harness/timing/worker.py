"""One side of an interleaved timing: a process that times one attention call at a time on request.

Run by harness.timing.interleave as `python worker.py` with PYTHONPATH at the tree it times (the base revision's
worktree, or this checkout), so `import harness` is that tree's code; this file is the coordinator's and uses only
the stable `harness.attention.Backend(name, **options)(q, k, v, training=True)` API. Protocol: one JSON object per
line on stdin, one reply per line on stdout:
    {"setup": {backend, options, draws, length, heads, head_dim, batch, dtype, device, warmup, seed}}
        -> {"kernel": ...}
    {"time": n, "rewarm": w} -> {"seconds": [n forward+backward times]}, after w untimed calls (the other
        worker ran since this one's last call: its caches and threads are cold)
`draws` are option overrides, one per choice the backend's training calls draw among (se_attn's chunk sizes;
[{}] for none: harness.attention.bench.draw_choices); a call is one call of each, timed as their mean, as
`harness bench attention` times them, so both sides time the same calls whatever their random draws.
An optional {"inject": module} first imports a module (tests use it to slow one backend down on purpose).
"""

import importlib
import json
import sys
import time

import torch


def _timed(backends, q, k, v, device) -> tuple[float, str]:
    """(mean seconds, kernel) of one forward+backward of each backend."""
    took = [_one(b, q, k, v, device) for b in backends]
    return sum(t for t, _ in took) / len(took), took[-1][1]


def _one(backend, q, k, v, device) -> tuple[float, str]:
    for t in (q, k, v):
        t.grad = None
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        t0 = time.perf_counter()
    out, kernel = backend(q, k, v, training=True)
    out.backward(torch.ones_like(out))
    if device.type == "cuda":
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3, kernel
    return time.perf_counter() - t0, kernel


def main() -> None:
    from harness.attention import Backend

    state = {}
    for line in sys.stdin:
        msg = json.loads(line)
        if "inject" in msg:
            importlib.import_module(msg["inject"])
            reply = {"ok": True}
        elif "setup" in msg:
            s = msg["setup"]
            device = torch.device(s["device"])
            g = torch.Generator().manual_seed(s["seed"])
            q, k, v = (torch.randn(s["batch"], s["heads"], s["length"], s["head_dim"], generator=g)
                       .to(device=device, dtype=getattr(torch, s["dtype"])).requires_grad_() for _ in range(3))
            backends = [Backend(s["backend"], **{**s["options"], **d}) for d in s.get("draws", [{}])]
            kernel = ""
            for _ in range(s["warmup"]):
                _, kernel = _timed(backends, q, k, v, device)
            state = {"backends": backends, "qkv": (q, k, v), "device": device}
            reply = {"kernel": kernel}
        else:
            for _ in range(msg.get("rewarm", 0)):
                _timed(state["backends"], *state["qkv"], state["device"])
            times = [_timed(state["backends"], *state["qkv"], state["device"])[0] for _ in range(msg["time"])]
            reply = {"seconds": times}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
