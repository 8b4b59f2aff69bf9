"""Mamba-2 mixer with mamba_ssm's parameter names (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import HybridConfig
from .conv import causal_conv
from .ssd import ssd_scan, ssd_step


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; with `gate`, mamba_ssm's gated, group-wise RMSNormGated."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None, norm_before_gate=False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.group_size, self.norm_before_gate = eps, group_size or dim, norm_before_gate

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if gate is not None and not self.norm_before_gate:
            x = x * F.silu(gate.float())
        shape = x.shape
        x = x.view(*shape[:-1], -1, self.group_size)
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).view(shape) * self.weight.float()
        if gate is not None and self.norm_before_gate:
            x = x * F.silu(gate.float())
        return x.to(dtype)


class Mamba2(nn.Module):
    """Mamba-2 mixer: in_proj -> (z, xBC, dt); causal conv on xBC; SSD scan; gated norm; out_proj."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        c = config.ssm_cfg
        self.layer_idx = layer_idx
        self.d_inner = c["expand"] * config.d_model
        self.d_state, self.ngroups, self.headdim = c["d_state"], c["ngroups"], c["headdim"]
        self.nheads = self.d_inner // self.headdim
        self.chunk_size, self.d_conv = c["chunk_size"], c["d_conv"]
        self.dt_limit = tuple(c["dt_limit"])
        self.dt_init = (c["dt_min"], c["dt_max"], c["dt_init_floor"])
        self.A_init_range = tuple(c["A_init_range"])
        conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        self.in_proj = nn.Linear(config.d_model, self.d_inner + conv_dim + self.nheads, bias=c["bias"])
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, self.d_conv, groups=conv_dim, padding=self.d_conv - 1,
                                bias=c["conv_bias"])
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.ones(self.d_inner if c["D_has_hdim"] else self.nheads))
        self.norm = RMSNorm(self.d_inner, 1e-5, self.d_inner // self.ngroups, c["norm_before_gate"]) \
            if c["rmsnorm"] else None
        self.out_proj = nn.Linear(self.d_inner, config.d_model, bias=c["bias"])

    def initial_ssm_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """mamba_ssm's init of (dt_bias, A_log): dt log-uniform in [dt_min, dt_max], A uniform in range."""
        dt_min, dt_max, floor = self.dt_init
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        return dt + torch.log(-torch.expm1(-dt)), torch.empty(self.nheads).uniform_(*self.A_init_range).log()

    def forward(self, u: torch.Tensor, cache=None) -> torch.Tensor:
        """u (b, l, d_model) -> (b, l, d_model); `cache` (a transformers Cache) carries conv and SSM states."""
        b, l, _ = u.shape
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv1d.in_channels, self.nheads], dim=-1)
        xBC = xBC.transpose(1, 2)
        prev = None
        if cache is not None:
            prev = cache.get_recurrent_state(self.layer_idx)
            xBC = cache.update_conv_state(xBC, self.layer_idx, conv_kernel_size=self.d_conv)
        xBC = causal_conv(xBC, self.conv1d, "silu")[..., -l:].transpose(1, 2)
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if self.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(*self.dt_limit)
        A = -torch.exp(self.A_log.float())
        D = self.D.view(self.nheads, self.headdim) if self.D.numel() == self.d_inner else self.D
        x = x.view(b, l, self.nheads, self.headdim)
        B, C = B.view(b, l, self.ngroups, self.d_state), C.view(b, l, self.ngroups, self.d_state)
        if prev is not None and l == 1:
            y, state = ssd_step(prev, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
            y = y.to(x.dtype)[:, None]
        else:
            init = None if prev is None else prev.to(x.dtype)
            y, state = ssd_scan(x, dt, A, B, C, self.chunk_size, D, init, return_final_states=True)
        if cache is not None:
            cache.update_recurrent_state(state.float(), self.layer_idx)
        y = y.reshape(b, l, self.d_inner)
        y = self.norm(y, z) if self.norm is not None else y * F.silu(z)
        return self.out_proj(y)
