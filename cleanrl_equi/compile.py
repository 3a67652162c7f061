"""What the compiled path (`--compile`) of the equivariant scripts needs besides torch.compile: a plain-torch copy of
an escnn network to act through.

Why a copy: torch.compile (dynamo) cannot trace escnn's layers. Every escnn module's forward asserts that its input
has the expected `FieldType` (a comparison of Python objects that hold NumPy arrays), and the basis expansion that
builds a filter from its coefficients calls `.item()` and NumPy; dynamo splits the graph there and runs each escnn
layer eagerly, so compiling an escnn network as it is gains nothing. In eval mode
an escnn layer is only a convolution with a fixed, already expanded filter, which is what escnn's own
`EquivariantModule.export()` turns it into (`R2Conv` -> `nn.Conv2d`, `ReLU` -> `nn.ReLU`, ...). `plain_copy` builds
that copy of a whole network once; `refresh` copies the current filters into it (in place, so the compiled graph
stays valid) after each update. The copy computes exactly what the escnn network computes in eval mode.

The update step cannot go through a copy (its gradients must reach escnn's basis coefficients), so it is compiled
as it is: the loss, backward and optimizer step are compiled and the escnn layers in between run eagerly. On a CPU
that is slower than eager (benchmarks/results/compile_speed_cpu.json): `--compile` pays for the plain networks only.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cleanrl_equi.equivariant import TensorToField, enn


class PlainField:
    """Stands in for escnn's GeometricTensor in a plain copy: it carries the tensor as `.tensor` and nothing else,
    so the network's own forward code (`...(x).tensor`) runs unchanged on the copy."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class _Exported(nn.Module):
    """An escnn module's export (plain torch), taking and returning `PlainField`s."""

    def __init__(self, plain: nn.Module):
        super().__init__()
        self.plain = plain

    def forward(self, field: PlainField) -> PlainField:
        return PlainField(self.plain(field.tensor))


class _ToPlainField(nn.Module):
    def forward(self, x: torch.Tensor) -> PlainField:
        return PlainField(x)


def plain_copy(network: nn.Module) -> nn.Module:
    """A copy of `network` (an EscnnModule) for acting under no_grad: each escnn child replaced by its plain-torch
    export, the TensorToField boundary by a `PlainField` wrapper; the network's own methods run on it unchanged.
    A network without escnn layers is returned as it is (it compiles as it is). The global RNG is left as it was
    (the exported layers are built with a random initialisation that `refresh` overwrites)."""
    if not any(isinstance(m, enn.EquivariantModule) for m in network.modules()):
        return network
    training = network.training
    twin = copy.deepcopy(network)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for name, child in list(twin.named_children()):
            if isinstance(child, enn.EquivariantModule):
                setattr(twin, name, _Exported(getattr(network, name).export()))
            elif isinstance(child, TensorToField):
                setattr(twin, name, _ToPlainField())
    network.train(training)  # export() left the escnn layers in eval mode
    nn.Module.train(twin, False)
    refresh(twin, network)
    return twin.requires_grad_(False)


def refresh(twin: nn.Module, network: nn.Module) -> None:
    """Copy the current weights of `network` into its plain copy `twin` (or a torch.compile of it) in place: each
    R2Conv's filter and bias, expanded from its coefficients as escnn does in eval mode. In either mode of
    `network`; call it after each update."""
    twin = getattr(twin, "_orig_mod", twin)
    if twin is network:
        return
    with torch.no_grad():
        for name, child in network.named_children():
            if isinstance(child, enn.EquivariantModule):
                plain = getattr(twin, name).plain
                for path, module in child.named_modules():
                    if isinstance(module, enn.R2Conv):
                        conv = plain.get_submodule(path) if path else plain
                        weight, bias = module.expand_parameters()
                        conv.weight.copy_(weight)
                        if bias is not None:
                            conv.bias.copy_(bias)
                    elif any(True for _ in module.parameters(recurse=False)):
                        raise NotImplementedError(f"refresh copies R2Conv weights only, not {type(module).__name__}'s")
            elif not isinstance(child, TensorToField):
                getattr(twin, name).load_state_dict(child.state_dict())
