"""Deterministic memory accounting: bytes held by autograd's saved tensors.

Every tensor autograd keeps for a backward pass (activations of a graph, a Function's
``save_for_backward``) goes through ``torch.autograd.graph.saved_tensors_hooks``. The
meter wraps each in a holder that counts its bytes while it is alive, so ``peak_bytes``
is the largest amount of saved-for-backward memory alive at any moment - independent of
the allocator, other processes and timing.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


class _Held:
    __slots__ = ("tensor", "meter", "nbytes")

    def __init__(self, tensor: Tensor, meter: "SavedTensorMeter") -> None:
        self.tensor, self.meter = tensor, meter
        self.nbytes = tensor.numel() * tensor.element_size()
        meter._alive += self.nbytes
        meter.peak_bytes = max(meter.peak_bytes, meter._alive)
        meter.count += 1

    def __del__(self) -> None:
        self.meter._alive -= self.nbytes


class SavedTensorMeter(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: ``with SavedTensorMeter() as m: loss = f(); loss.backward()``;
    then ``m.peak_bytes`` is the peak of saved-tensor bytes alive, ``m.count`` how many
    tensors were saved in all. Wrap both the forward and the backward call.

    Tensors saved more than once (e.g. a weight used at every step) are counted each time,
    as autograd may hold them separately.

    Holders keep ``tensor.detach()`` (same storage, same bytes): holding the tensor itself
    makes a reference cycle when an op saves its own output (softmax, exp: output -> grad_fn
    -> holder -> output) that keeps whole graphs alive under ``retain_graph=True`` (as in
    torchdiffeq's ``odeint_adjoint``). Unpacked tensors lose only their ``grad_fn``, which
    first-order backward passes never use.
    """

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.count = 0
        self._alive = 0
        super().__init__(lambda t: _Held(t.detach(), self), lambda h: h.tensor)

    def __enter__(self) -> "SavedTensorMeter":
        super().__enter__()
        return self

    @property
    def alive_bytes(self) -> int:
        return self._alive
