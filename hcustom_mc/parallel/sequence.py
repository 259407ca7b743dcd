"""Megatron sequence parallelism (SP) for the DiT's [image ; text] hidden state.

With TP > 1 and `sequence_parallel`, the hidden state between the TP regions (norms, adaLN
modulation, gates, residual adds) is split along the sequence over the TP group. megatron's
column-parallel linears all-gather their input along dim 0 (the sequence: our tensors are [S, B, C])
and the row-parallel linears reduce-scatter their output, so the blocks' linears need no change.

Layout. The two streams have different weights in the double blocks, so each is split on its own:
image and text are zero-padded to a multiple of TP (image_pad, text_pad) and rank r holds
[image part r ; text part r] (the *local* rows). A column linear on the whole local tensor therefore
returns the rank-major *gathered* order [img_0 ; txt_0 ; img_1 ; txt_1 ...]; `streams()` reorders it
to [image (padded) ; text (padded)] and `interleave()` back, both pure index permutations. A linear on
one stream's local rows returns that stream padded, in order. Pad rows start as zeros, stay finite
through the token-wise ops, are dropped before attention and at the exit, so they change no result
and get no gradient. Without SP (tp == 1) every method is the identity (or the plain stream split).

Gradients: the modulation vectors (shift/scale/gate, replicated over TP) meet only this rank's
tokens, so their gradient is a per-rank partial sum: `replicated()` all-reduces it in backward
(megatron's copy-to-TP-region). Row-parallel biases are added after the reduce-scatter, so their
gradients are partial too: megatron marks them `sequence_parallel` and its finalize_model_grads sums
them over TP (the training step calls it, training/loop.py `_finalize`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def _ceil_to(n: int, k: int) -> int:
    return -(-n // k) * k


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


@dataclass(frozen=True)
class SequenceLayout:
    """How this rank holds the hidden state [image_len image tokens ; text_len text tokens] (the
    CP-local sequence under context parallelism) in the sequence-parallel region."""

    image_len: int
    text_len: int
    tp: int = 1  # 1: no sequence parallelism
    group: object = field(default=None, compare=False)  # the TP group the sequence is split over

    @classmethod
    def build(cls, image_len: int, text_len: int, sequence_parallel: bool, tp_group=None) -> "SequenceLayout":
        """`tp_group`: the model's TP group (its ProcessGroupCollection's `tp`)."""
        if not sequence_parallel:
            return cls(image_len, text_len)
        from hcustom_mc.parallel.groups import group_size

        return cls(image_len, text_len, group_size(tp_group), tp_group)

    @property
    def active(self) -> bool:
        return self.tp > 1

    @property
    def image_pad(self) -> int:
        """Image rows of a gathered (full, padded) stream tensor."""
        return _ceil_to(self.image_len, self.tp)

    @property
    def text_pad(self) -> int:
        return _ceil_to(self.text_len, self.tp)

    @property
    def local_image(self) -> int:
        return self.image_pad // self.tp

    @property
    def local_rows(self) -> int:
        """Rows of the hidden state held here (what pipeline stages send)."""
        return (self.image_pad + self.text_pad) // self.tp

    @property
    def padded(self) -> bool:
        return self.image_pad != self.image_len or self.text_pad != self.text_len

    # ---------------------------------------------------------------- local reindexing (no communication)
    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Local rows -> (image rows, text rows) held here."""
        return x[: self.local_image], x[self.local_image :]

    def streams(self, t: Tensor) -> Tensor:
        """Gathered rank-major order [img_0 ; txt_0 ; img_1 ; ...] -> [image (padded) ; text (padded)]."""
        if not self.active:
            return t
        g = t.unflatten(0, (self.tp, self.local_rows))
        return torch.cat([g[:, : self.local_image].flatten(0, 1), g[:, self.local_image :].flatten(0, 1)])

    def interleave(self, t: Tensor) -> Tensor:
        """[image (padded) ; text (padded)] -> gathered rank-major order (what a reduce-scatter splits)."""
        if not self.active:
            return t
        img = t[: self.image_pad].unflatten(0, (self.tp, self.local_image))
        txt = t[self.image_pad :].unflatten(0, (self.tp, self.local_rows - self.local_image))
        return torch.cat([img, txt], dim=1).flatten(0, 1)

    def unpad(self, t: Tensor) -> Tensor:
        """[image (padded) ; text (padded)] -> [image ; text] (what attention sees)."""
        if not self.padded:
            return t
        return torch.cat([t[: self.image_len], t[self.image_pad : self.image_pad + self.text_len]])

    def pad(self, t: Tensor) -> Tensor:
        """[image ; text] -> [image (padded) ; text (padded)], pad rows zero."""
        if not self.padded:
            return t
        return torch.cat([_pad_rows(t[: self.image_len], self.image_pad), _pad_rows(t[self.image_len :], self.text_pad)])

    # ---------------------------------------------------------------- region boundaries (communication)
    def scatter(self, x: Tensor) -> Tensor:
        """Enter the SP region: replicated [image ; text] -> this rank's local rows (backward: all-gather)."""
        if not self.active:
            return x
        from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region

        return scatter_to_sequence_parallel_region(self.interleave(self.pad(x)), group=self.group)

    def gather(self, x: Tensor) -> Tensor:
        """Leave the SP region: local rows -> [image ; text] on every rank, used replicated downstream
        (so the backward just keeps this rank's rows of the identical gradients)."""
        if not self.active:
            return x
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        gathered = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=self.group)
        return self.unpad(self.streams(gathered))

    def replicated(self, t: Tensor) -> Tensor:
        """A TP-replicated tensor (modulation vectors) used on this rank's tokens only: forward identity,
        backward all-reduce of its partial gradient over TP."""
        if not self.active:
            return t
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        return copy_to_tensor_model_parallel_region(t, group=self.group)


NO_SP = SequenceLayout(0, 0, 1)  # for callers without a sequence (the identity layout)
