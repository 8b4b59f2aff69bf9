"""The registered attention backends, in the order `harness list` lists them. Add one: a module here
with a `SPEC` (see ../spec.py), listed below."""

from ..spec import Spec
from . import full, s2_attn, se_attn, sliding_window

SPECS: dict[str, Spec] = {m.SPEC.name: m.SPEC for m in (full, sliding_window, s2_attn, se_attn)}
