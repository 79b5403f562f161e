"""Caches kept in a module's ``__dict__`` (query-time state: attributors with their stores' blocks, parameter spaces,
weights digests, readout plans), which a copy or a pickle of the module does not carry."""

from __future__ import annotations

from typing import Any

from torch import nn


class ModuleCache(dict):
    """A ``dict`` that pickles, copies and deep-copies as an empty one: ``torch.save(module)``, ``copy.deepcopy`` (as
    Lightning's ``WeightAveraging`` copies a model) or a spawned process get a cold cache instead of the stores' blocks
    (megabytes to gigabytes) and keys tied to this process (parameters' ``data_ptr``)."""

    def __reduce__(self) -> tuple[type, tuple]:
        return type(self), ()


def module_cache(module: nn.Module, name: str) -> dict[Any, Any]:
    """The :class:`ModuleCache` ``name`` of ``module`` (kept in its ``__dict__``: not a submodule, buffer or
    attribute that ``state_dict`` sees), created empty on first use."""
    cache = module.__dict__.get(name)
    if not isinstance(cache, ModuleCache):
        cache = module.__dict__[name] = ModuleCache()
    return cache
