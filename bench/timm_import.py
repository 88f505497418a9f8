"""timm, importable beside the CPU build of torch that these machines install (for the tests'
references and bench's comparisons; torch and timm are never imported by the trainer)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


def import_timm():
    """timm imports torchvision at import time, only for code we do not use (data transforms,
    FrozenBatchNorm). PyPI's torchvision does not import beside the CPU torch build these machines
    install, so an empty stand-in package satisfies those imports while timm is imported, and is
    removed again so that transformers does not mistake it for the real one."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    import torch

    class _Meta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return f"{cls.__name__}.{name}"

    class _Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            value = _Meta(name, (torch.nn.Module,), {})
            setattr(self, name, value)
            return value

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            module = _Module(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    finder = _Finder()
    sys.meta_path.insert(0, finder)
    try:
        import timm
    finally:
        sys.meta_path.remove(finder)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    return timm
