"""``compile_integer``: the integer model as one ``torch.compile`` graph, bit for bit the eager one."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import kernels
from .layers import IntegerLinear

__all__ = ["compile_integer", "CompiledIntegerModel"]


class CompiledIntegerModel(nn.Module):
    """An integer model and its ``torch.compile`` graph: ``forward(images) -> logits``.

    ``images`` ``[B, in_chans, H, W]`` → ``[B, num_classes]``, equal bit for bit to ``integer``'s
    eager forward with the same GEMM backend. Inference only: it runs under ``torch.no_grad`` with
    inductor's freezing, which captures the weights (and oneDNN's packed weights) as constants of
    the graph when it is compiled, on the first call and again for every new input shape; changing
    the integer model's buffers afterwards is not seen by graphs already compiled.
    """

    def __init__(self, integer: nn.Module, backend: str) -> None:
        super().__init__()
        self.integer = integer
        self.backend = backend
        self._compiled = torch.compile(integer)

    def forward(self, images: Tensor) -> Tensor:
        # freezing is read when a graph is compiled (lazily, at a call), so it is set around calls
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            return self._compiled(images)


def compile_integer(integer: nn.Module, backend: str | None = None) -> CompiledIntegerModel:
    """The fast form of an integer model of :func:`~fqvit_pl.quant.to_integer` (CPU or GPU).

    Sets the GEMM ``backend`` on ``integer`` (in place; default ``"onednn"`` where oneDNN's
    quantized linear runs, else ``"int_mm"``), builds oneDNN's packed weights, and wraps it in
    ``torch.compile`` with inductor's freezing: one graph per forward (no graph breaks; the
    data-dependent choices were made when the model was converted), the weights folded as
    constants, the elementwise integer code fused between the GEMMs. The logits equal the eager
    integer model's with the same backend, bit for bit (the float operations whose last bit
    inductor could compute differently run as ATen's kernels: GELU, the LayerNorm's ``sqrt``).

    Compilation happens at the first call and takes a while (1.5-5 minutes for deit_tiny at 224
    on 2 shared CPU cores, more for larger models; each new input shape compiles again); later calls
    are fast. Inference only (no gradients).
    """
    if not hasattr(integer, "set_backend"):
        raise TypeError(
            f"compile_integer: expected a model of fqvit_pl.quant.to_integer, got {type(integer).__name__}"
        )
    if backend is None:
        backend = "onednn" if kernels.onednn_available() else "int_mm"
    integer.set_backend(backend)
    integer.eval()
    if backend == "onednn":
        for module in integer.modules():
            if isinstance(module, IntegerLinear):
                module._packed_weight()  # built eagerly: a graph constant, not traced
    return CompiledIntegerModel(integer, backend)
