"""The classes an accelerated layer runs under: for each PEFT (or bitsandbytes) layer class, one runtime subclass
whose ``forward`` is fastpeft's (:func:`fast_class`). :func:`~fastpeft.accelerate` switches a layer by assigning
its ``__class__``, so the layer keeps its submodules, Parameters and state-dict keys; the subclass keeps PEFT's
class name (``repr`` and ``type(layer).__name__`` read as PEFT's), pickles as the class it was made from (a saved
model loads without fastpeft) and survives ``copy.deepcopy``."""

from __future__ import annotations

import copy
import copyreg
from typing import Callable

__all__ = ["fast_class", "is_accelerated"]


def _reduce_as_peft_class(self, protocol):
    """Pickling (``torch.save`` of a model, or of what PEFT's ``merge_and_unload`` / ``unload`` return) writes the
    layer as PEFT's (or bitsandbytes') own class, which loads without fastpeft; the runtime class itself has no
    importable name. The object is rebuilt as ``object.__new__(peft_class)`` through copyreg's reconstructor (what
    protocols 0 and 1 write; protocol 2's ``__newobj__`` insists on the object's own class), then its state set."""
    _, _, *rest = object.__reduce_ex__(self, protocol)
    return (copyreg._reconstructor, (type(self)._fastpeft_peft_class, object, None), *rest)


def _deepcopy_keeping_class(self, memo):
    """``copy.deepcopy`` keeps the accelerated class (it would otherwise follow the pickling reduction)."""
    copied = type(self).__new__(type(self))
    memo[id(self)] = copied
    copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
    return copied


_FAST_CLASSES: dict = {}


def fast_class(peft_class: type, kind: str, forward: Callable) -> type:
    """The subclass of ``peft_class`` whose forward is ``forward`` (one per PEFT class: a class is always given the
    same forward). ``kind`` (``lora``, ``ia3``, ``adalora``; ``nf4`` for a bitsandbytes ``Linear4bit``) is kept as
    ``_fastpeft_kind`` for that forward, ``peft_class`` as ``_fastpeft_peft_class``."""
    if peft_class not in _FAST_CLASSES:
        _FAST_CLASSES[peft_class] = type(
            peft_class.__name__, (peft_class,),
            {"forward": forward, "__reduce_ex__": _reduce_as_peft_class, "__deepcopy__": _deepcopy_keeping_class,
             "_fastpeft_peft_class": peft_class, "_fastpeft_kind": kind,
             "__module__": __name__, "__qualname__": peft_class.__qualname__},
        )
    return _FAST_CLASSES[peft_class]


def is_accelerated(module) -> bool:
    """Whether ``module`` runs under a class :func:`fast_class` made."""
    return "_fastpeft_peft_class" in type(module).__dict__
