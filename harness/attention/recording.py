"""Which kernels actually ran: a process-wide tally plus `recording()` scopes for one run's records."""

from collections import Counter
from contextlib import contextmanager

_totals: Counter = Counter()
_scopes: list[set] = []


def record(kernel: str) -> str:
    _totals[kernel] += 1
    for scope in _scopes:
        scope.add(kernel)
    return kernel


@contextmanager
def recording():
    """`with recording() as kernels: model(...)` leaves in `kernels` (a set) every kernel string used inside."""
    kernels: set = set()
    _scopes.append(kernels)
    try:
        yield kernels
    finally:
        # by identity: list.remove compares by value, and an inner scope that saw what the outer one saw (a
        # fine-tune's inside a cell's) would take the outer one off the list instead
        del _scopes[next(i for i, s in enumerate(_scopes) if s is kernels)]


def kernel_log() -> dict[str, int]:
    """Every kernel string used in this process so far, with its call count."""
    return dict(_totals)


@contextmanager
def unrecorded():
    """Kernels used inside are left out of the open `recording()` scopes (a self-check, not the measurement)."""
    scopes = _scopes[:]
    _scopes.clear()
    try:
        yield
    finally:
        _scopes[:] = scopes
