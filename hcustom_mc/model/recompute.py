"""Selective recomputation of the cheap, memory-heavy glue: recompute an activation instead of keeping it.

`DiscardAfterUse` computes y = fn(*inputs) without a graph. y feeds one consumer that keeps y for its
own backward (a linear layer keeps its input). Once the consumer has run, `discard(consumer_out)`
frees y's storage; a hook on the consumer's output gradient recomputes y into the same storage just
before the consumer's backward needs it, and y's own backward then runs through the recomputed graph.
So a LayerNorm + modulation output, or an MLP activation, costs no memory between forward and
backward, and nothing is computed twice except those element-wise ops. The attention core is never
recomputed (its kernels keep only q, k, v, the output and the log-sum-exp).

The recomputed ops are deterministic (no dropout), so no RNG state is saved. Storage-level refills do
not bump version counters, so the consumer's saved-tensor checks still pass.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _Discardable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, holder, *inputs):
        with torch.no_grad():
            out = fn(*inputs)
        ctx.save_for_backward(*inputs)
        holder.ctx = ctx
        return out

    @staticmethod
    def backward(ctx, grad):
        holder = ctx.holder
        if holder.recomputed is None:  # the consumer hook never fired (output unused): recompute now
            holder.recompute()
        inputs, out = holder.inputs, holder.recomputed
        # the consumer's backward is done: drop the refilled activation too (the graph's nodes live until
        # the whole backward ends, so a reference kept here would hold every refill to the end)
        holder.inputs = holder.recomputed = holder.out = None
        torch.autograd.backward(out, grad)
        return (None, None) + tuple(t.grad if t.requires_grad else None for t in inputs)


class DiscardAfterUse:
    """One activation recomputed in backward; see the module docstring. Use once per activation."""

    def __init__(self):
        self.fn = self.ctx = self.out = self.inputs = self.recomputed = None

    def __call__(self, fn, *inputs: Tensor) -> Tensor:
        self.fn = fn
        self.out = _Discardable.apply(fn, self, *inputs)
        self.ctx.holder = self
        return self.out

    def discard(self, consumer_out: Tensor) -> None:
        """Free the activation now; refill it when the gradient of `consumer_out` arrives."""
        ptr = self.out.untyped_storage().data_ptr()
        if any(t.untyped_storage().data_ptr() == ptr for t in self.ctx.saved_tensors):
            return  # fn returned a view of an input: freeing it would free the input
        if not consumer_out.requires_grad:
            return  # no backward will come to refill it
        self.out.untyped_storage().resize_(0)
        consumer_out.register_hook(lambda grad: self.recompute())

    def recompute(self) -> None:
        if self.recomputed is not None:
            return
        self.inputs = tuple(t.detach().requires_grad_(t.requires_grad) for t in self.ctx.saved_tensors)
        with torch.enable_grad():
            self.recomputed = self.fn(*self.inputs)
        storage = self.out.untyped_storage()
        storage.resize_(self.recomputed.untyped_storage().nbytes())
        storage.copy_(self.recomputed.untyped_storage())


def consume(selective: bool, fn, inputs: tuple, consumer) -> Tensor:
    """consumer(fn(*inputs)); with `selective`, fn's output is freed after the consumer and recomputed."""
    if not selective:
        return consumer(fn(*inputs))
    holder = DiscardAfterUse()
    out = consumer(holder(fn, *inputs))
    holder.discard(out)
    return out
