"""The generation cache under every name transformers has passed it by, in and out of a model's forward.

transformers 5.0-5.23 hand a model its cache as ``past_key_values`` (``cache_params`` for Mamba models);
5.24 renamed the argument and the output field to ``cache``. A forward that takes ``**kwargs`` and knows only
one of the names silently drops the cache under the others, and generation then restarts from an empty cache
at every step. :func:`take_cache` accepts each name and refuses a cache under any name it does not know.
"""

from __future__ import annotations

import dataclasses

from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_NAMES = ("cache", "past_key_values", "cache_params")

# The field that model outputs hold the cache in, in the installed transformers ("cache" from 5.24 on).
OUTPUT_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def take_cache(kwargs: dict) -> Cache | None:
    """Pop the cache from a forward's keyword arguments, whatever its name; a TypeError if two names hold
    one, or a Cache sits under a name this model would ignore."""
    given = {name: kwargs.pop(name) for name in CACHE_NAMES if kwargs.get(name) is not None}
    if len(given) > 1:
        raise TypeError(f"a cache was passed under several names ({', '.join(given)}); pass one")
    stray = [name for name, value in kwargs.items() if isinstance(value, Cache)]
    if stray:
        raise TypeError(f"a cache was passed as {stray[0]!r}, which this model does not read (it reads "
                        f"{', '.join(CACHE_NAMES)}): the cache would be dropped and every step start from empty")
    return next(iter(given.values()), None)


def output_cache(output) -> Cache | None:
    """The cache a model output carries, under the installed transformers' field name."""
    return getattr(output, OUTPUT_FIELD, None)
