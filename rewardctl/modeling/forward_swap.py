"""Give one module a forward of ours by swapping its class for a generated subclass of its own.

Why a class and not an instance attribute: a copy of the model (``deepcopy``) keeps the behaviour on
its own weights, hooks and ``__call__`` stay transformers' own, and the subclass keeps the stock
class's ``__name__``, because accelerate's FSDP auto-wrap finds layer classes by the names in
``_no_split_modules``. Parameters and saved files stay stock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

#: Set on every generated class, so code that judges a model by its class's stock forward (its
#: signature, what it slices) can look past the swap (``stock_class``).
GENERATED = "_rewardctl_generated_by_forward_swap"


def stock_class(cls: type) -> type:
    """The first class in ``cls``'s MRO that no ``ForwardSwap`` generated: ``cls`` itself for a stock
    class, the stock class under a swapped one (or under a wrapper of a swapped one)."""
    generated = [klass for klass in cls.__mro__ if vars(klass).get(GENERATED)]
    if not generated:
        return cls
    return cls.__mro__[cls.__mro__.index(generated[-1]) + 1]


def forward_owner(cls: type) -> type | None:
    """The class whose ``forward`` the stock class under ``cls`` runs (the first in its MRO defining
    one: FSDP2's wrapper class defines none), or None."""
    return next((klass for klass in stock_class(cls).__mro__ if "forward" in vars(klass)), None)


def fsdp_unwrapped_class(module: nn.Module) -> type:
    """``module``'s class, or under FSDP2's ``fully_shard`` the class it wrapped (``FSDPLlamaDecoderLayer``
    has the bases ``(FSDPModule, LlamaDecoderLayer)``), for checks that judge a layer by its class."""
    cls = type(module)
    bases = cls.__bases__
    return bases[1] if len(bases) == 2 and bases[0].__name__ == "FSDPModule" else cls


class ForwardSwap:
    """One replacement ``forward``; one generated subclass per stock class it is applied to."""

    def __init__(self, forward: Callable[..., Any], qualname_prefix: str, module_name: str) -> None:
        self._forward = forward
        self._prefix = qualname_prefix
        self._module_name = module_name
        self._classes: dict[type, type] = {}

    def applied(self, module: nn.Module) -> bool:
        """Whether ``module`` runs the replacement forward (also under a class that wraps ours again,
        such as FSDP2's ``fully_shard``)."""
        generated = set(self._classes.values())
        return any(klass in generated for klass in type(module).__mro__)

    def stock_forward(self, module: nn.Module) -> Callable[..., Any]:
        """The stock class's ``forward``, unbound: call it with ``module`` first."""
        return stock_class(type(module)).forward

    def apply(self, module: nn.Module) -> None:
        if self.applied(module):
            return
        stock = type(module)
        if stock not in self._classes:
            self._classes[stock] = type(
                stock.__name__,
                (stock,),
                {
                    "forward": self._forward,
                    "__qualname__": f"{self._prefix}{stock.__name__}",
                    "__module__": self._module_name,
                    GENERATED: True,
                },
            )
        module.__class__ = self._classes[stock]

    def undo(self, module: nn.Module) -> None:
        """The stock class again. A module whose class was wrapped again since keeps it."""
        if type(module) in self._classes.values():
            module.__class__ = stock_class(type(module))
