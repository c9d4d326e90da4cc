"""What fastpeft's autograd Functions need so that ``torch.compile`` traces them correctly on every supported torch."""

from __future__ import annotations

import functools

import torch
from torch.torch_version import TorchVersion

# torch 2.11's dynamo mistraces a forward that returns a tensor an op gave back as itself (fresh_output_when_compiling)
_COPIES_RETURNED_ALIASES = (2, 11) <= TorchVersion(torch.__version__) < (2, 12)


def fresh_output_when_compiling(function: type) -> type:
    """Class decorator for a ``torch.autograd.Function`` whose ``forward`` may return a tensor that an op inside it
    gave back as itself: written in place (``addmm_``, ``add_``, ``+=``), or passed through a ``.to(dtype)`` /
    ``.contiguous()`` that had nothing to do. On torch other than 2.11 it returns the class untouched (nothing added
    to a call).

    On torch 2.11, dynamo tracing such a forward (``torch.compile``, the ``eager`` and ``aot_eager`` backends
    included) makes the tensor as that op received it a second output of the traced forward. Both are the same
    tensor object, so autograd records the returned tensor as that second output, and the gradient of the output
    reaches the Function's backward in a slot the backward never reads: the inputs get zero gradients from it,
    silently. Torch 2.8, 2.12 and 2.13 trace the same forward correctly. So on 2.11, while dynamo traces, the
    decorated forward returns a copy of its result (a tensor of its own, the traced forward's one output); eager
    calls return the result itself."""
    if not _COPIES_RETURNED_ALIASES:
        return function
    forward = function.forward

    @functools.wraps(forward)
    def forward_with_fresh_output(ctx, *args):
        out = forward(ctx, *args)
        return out.clone() if torch.compiler.is_compiling() else out

    function.forward = staticmethod(forward_with_fresh_output)
    return function
