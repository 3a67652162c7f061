"""A traceable twin of an escnn network, so that torch.compile can compile a whole update step through it.

Why: dynamo cannot trace escnn's layers. Each forward asserts that its input has the expected `FieldType` (a
comparison of objects holding NumPy arrays), and the basis expansion reshapes by 0-d index tensors (`.item()`), so
dynamo splits the graph at every layer, recompiles escnn's functions until its cache limit and runs them eagerly
between compiled pieces. Once built, a layer is simple arithmetic: a fixed sampled basis contracted with the learnable
coefficients gives the filter, then a plain convolution; pooling and nonlinearities are index operations.

`traceable(network)` builds that arithmetic as plain torch modules:

- each escnn layer becomes a small module that holds the *same* parameter objects and the same buffers, under the
  same names (escnn's sampled bases, bias expansion and pooling indices are shared, not copied). The twin's
  `state_dict` is the escnn network's, key for key, and either loads into the other; an optimizer built on the escnn
  network's parameters updates the twin too (they are the same tensors).
- an R2Conv twin expands its filter and bias from the coefficients at every forward pass, in the graph, with escnn's
  own sampled basis and escnn's own operations in escnn's order (the same numbers as escnn in train mode, and as escnn
  in eval mode, whose cached filter holds the same expansion of the same weights). escnn stays the source of truth
  for field types and bases: nothing here derives a basis.
- the outputs are escnn GeometricTensors of the layer's output type (building one traces), so the network's own
  methods (`...(x).tensor`, a critic that joins features and actions into a GeometricTensor) run unchanged on it.

The twin has no eval-mode filter cache: it is for the update step (and anything else that runs in train mode).
Acting under `--compile` goes through `equivariant.plain_copy`, whose filters are expanded once per update, not at
every step. `through_traced(fn, *networks)` calls `fn` with each escnn network among its arguments replaced by its
twin, which is how a script sends its compiled update through the twins without changing the update's call.
"""

from __future__ import annotations

import copy
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cleanrl_equi.equivariant import EscnnModule, _FILTER_CACHE, _holds_escnn, enn

# ---- Traceable layers -------------------------------------------------------------------------------------------------


class TracedR2Conv(nn.Module):
    """escnn's R2Conv, with the filter and bias expanded from the coefficients inside the forward pass."""

    def __init__(self, conv: enn.R2Conv):
        super().__init__()
        if conv.d != 2:
            raise NotImplementedError(f"a traceable R2Conv is two-dimensional, not {conv.d}-dimensional")
        self.in_type, self.out_type = conv.in_type, conv.out_type
        for name, param in conv._parameters.items():  # escnn's order (bias, weights), the very same tensors
            self.register_parameter(name, param)
        if "bias" not in self._parameters:
            self.bias = None
        cache = {name.lstrip(".") for name in _FILTER_CACHE}
        for name, buffer in conv._buffers.items():
            if name not in cache:
                self.register_buffer(name, buffer, persistent=name not in conv._non_persistent_buffers_set)
        expansion = conv.basisexpansion
        self._basisexpansion = expansion  # shared: its sampled bases (and escnn's state_dict keys for them)
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups, self.padding_mode = conv.dilation, conv.groups, conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self._points = expansion.S
        self._shape = (expansion._output_size, expansion._input_size)
        # One entry per pair of field types, in escnn's order: where its coefficients are in `weights`, its block's
        # submodule name, the field counts, and where the block goes in the filter. escnn keeps the contiguous ranges
        # as 0-d tensors (reading them is a `.item()`); here they are Python ints, fixed at build time.
        self._blocks = []
        for pair in expansion._representations_pairs:
            escaped = expansion._escape_pair(pair)
            start, stop = expansion._weights_ranges[pair]
            if expansion._contiguous[pair]:
                rows = getattr(expansion, f"out_indices_{escaped}")
                cols = getattr(expansion, f"in_indices_{escaped}")
                place = (int(rows[0]), int(rows[1]), int(cols[0]), int(cols[1]))
            else:
                place = (f"out_indices_{escaped}", f"in_indices_{escaped}")  # index buffers of `expansion`
            self._blocks.append((f"block_expansion_{escaped}", start, stop, expansion._out_count[pair[1]],
                                 expansion._in_count[pair[0]], place))

    def _expand_block(self, name: str, start: int, stop: int, out_count: int, in_count: int) -> torch.Tensor:
        basis = getattr(self._basisexpansion, name).sampled_basis
        coefficients = self.weights[start:stop].view(-1, basis.shape[0])
        block = torch.einsum("boi...,kb->koi...", basis, coefficients)  # escnn's contraction, operand for operand
        _, o, i, _ = block.shape
        return block.view(out_count, in_count, o, i, self._points).transpose(1, 2)

    def expand_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense filter and bias, as escnn's `R2Conv.expand_parameters` computes them."""
        out_size, in_size = self._shape
        if len(self._blocks) == 1:
            name, start, stop, out_count, in_count, _ = self._blocks[0]
            weight = self._expand_block(name, start, stop, out_count, in_count).reshape(out_size, in_size,
                                                                                         self._points)
        else:
            weight = None
            for name, start, stop, out_count, in_count, place in self._blocks:
                block = self._expand_block(name, start, stop, out_count, in_count)
                if weight is None:  # the block's dtype, which autocast chooses
                    weight = torch.zeros(out_size, in_size, self._points, device=block.device, dtype=block.dtype)
                if isinstance(place[0], int):
                    row0, row1, col0, col1 = place
                    weight[row0:row1, col0:col1, :] = block.reshape(row1 - row0, col1 - col0, self._points)
                else:
                    rows, cols = getattr(self._basisexpansion, place[0]), getattr(self._basisexpansion, place[1])
                    weight[rows, cols, :] = block.reshape(-1, self._points)
        weight = weight.reshape(out_size, in_size, self.kernel_size, self.kernel_size)
        bias = None if self.bias is None else self.bias_expansion @ self.bias
        return weight, bias

    def forward(self, field: enn.GeometricTensor) -> enn.GeometricTensor:
        weight, bias = self.expand_parameters()
        x = field.tensor
        if self.padding_mode == "zeros":
            out = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        else:
            out = F.conv2d(F.pad(x, self._reversed_padding_repeated_twice, self.padding_mode), weight, bias,
                           self.stride, 0, self.dilation, self.groups)
        return enn.GeometricTensor(out, self.out_type)


class TracedReLU(nn.Module):
    """escnn's ReLU (pointwise, on fields that allow it: escnn checked that when it built the layer)."""

    def __init__(self, relu: enn.ReLU):
        super().__init__()
        self.out_type, self.inplace = relu.out_type, relu._inplace

    def forward(self, field: enn.GeometricTensor) -> enn.GeometricTensor:
        return enn.GeometricTensor(F.relu(field.tensor, inplace=self.inplace), self.out_type)


# Max pooling as two opaque operators (forward, backward) that run ATen's own kernels inside a compiled graph.
# Inductor's generated C++ for max_pool2d_with_indices and its backward (fused with the ReLU's backward) made a
# compiled update of the manipulation networks 2x slower than eager on a CPU: about 100 ms per update in those kernels
# alone, against 7 ms for ATen's (torch.profiler, benchmarks/update_layout.py settings, torch 2.15). Kept opaque,
# they cost what they cost eagerly, and give the same numbers and the same gradients (the same argmax) as escnn.
@torch.library.custom_op("cleanrl_equi::max_pool2d", mutates_args=())
def _max_pool2d(x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                ceil_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)


@_max_pool2d.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode):
    return torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)


@torch.library.custom_op("cleanrl_equi::max_pool2d_backward", mutates_args=())
def _max_pool2d_backward(grad: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, kernel_size: list[int],
                         stride: list[int], padding: list[int], dilation: list[int],
                         ceil_mode: bool) -> torch.Tensor:
    return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, kernel_size, stride, padding, dilation,
                                                           ceil_mode, indices)


@_max_pool2d_backward.register_fake
def _(grad, x, indices, kernel_size, stride, padding, dilation, ceil_mode):
    return torch.empty_like(x)


def _max_pool2d_setup(ctx, inputs, output):
    x, *ctx.pool = inputs
    ctx.save_for_backward(x, output[1])


def _max_pool2d_grad(ctx, grad, _):
    x, indices = ctx.saved_tensors
    return (_max_pool2d_backward(grad.contiguous(memory_format=_memory_format(x)), x, indices, *ctx.pool),
            None, None, None, None, None)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


_max_pool2d.register_autograd(_max_pool2d_grad, setup_context=_max_pool2d_setup)


def _pair(value) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


class TracedMaxPool2D(nn.Module):
    """escnn's PointwiseMaxPool2D: a max over each channel's window, which commutes with permutation fields."""

    def __init__(self, pool: enn.PointwiseMaxPool2D):
        super().__init__()
        self.out_type = pool.out_type
        self.pool = [_pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding), _pair(pool.dilation),
                     bool(pool.ceil_mode)]

    def forward(self, field: enn.GeometricTensor) -> enn.GeometricTensor:
        return enn.GeometricTensor(_max_pool2d(field.tensor, *self.pool)[0], self.out_type)


class TracedGroupPooling(nn.Module):
    """escnn's GroupPooling: the max over each field's channels, one invariant channel per field. Its output is
    float32, as escnn's (which writes the maxima into a float32 tensor, under bfloat16 autocast too)."""

    def __init__(self, pool: enn.GroupPooling):
        super().__init__()
        self.out_type = pool.out_type
        for name, buffer in pool._buffers.items():  # escnn's index buffers (and state_dict keys), shared
            self.register_buffer(name, buffer, persistent=name not in pool._non_persistent_buffers_set)
        self._groups = []  # (field size, contiguous, channel range or index buffer names)
        for size, contiguous in pool._contiguous.items():
            channels, fields = getattr(pool, f"in_indices_{size}"), getattr(pool, f"out_indices_{size}")
            where = ((int(channels[0]), int(channels[1]), int(fields[0]), int(fields[1])) if contiguous
                     else (f"in_indices_{size}", f"out_indices_{size}"))
            self._groups.append((size, contiguous, where))
        self._n_fields = len(pool.in_type)

    def forward(self, field: enn.GeometricTensor) -> enn.GeometricTensor:
        x = field.tensor
        batch, spatial = x.shape[0], x.shape[2:]
        out = torch.empty((batch, self._n_fields, *spatial), device=x.device, dtype=torch.float)
        for size, contiguous, where in self._groups:
            if contiguous:
                channel0, channel1, field0, field1 = where
                maxima = x[:, channel0:channel1].reshape(batch, -1, size, *spatial).amax(2)
                out[:, field0:field1] = maxima
            else:
                channels, fields = getattr(self, where[0]), getattr(self, where[1])
                out[:, fields] = x[:, channels].reshape(batch, -1, size, *spatial).amax(2)
        return enn.GeometricTensor(out, self.out_type)


class TracedSequential(nn.Module):
    """escnn's SequentialModule: the traced layers under escnn's names ("0", "1", ...)."""

    def __init__(self, sequential: enn.SequentialModule):
        super().__init__()
        self.out_type = sequential.out_type
        for name, child in sequential.named_children():
            self.add_module(name, traced_layer(child))

    def forward(self, field: enn.GeometricTensor) -> enn.GeometricTensor:
        for layer in self._modules.values():
            field = layer(field)
        return field


_TRACED = {enn.R2Conv: TracedR2Conv, enn.ReLU: TracedReLU, enn.PointwiseMaxPool2D: TracedMaxPool2D,
           enn.GroupPooling: TracedGroupPooling, enn.SequentialModule: TracedSequential}


def traced_layer(module: enn.EquivariantModule) -> nn.Module:
    """The traceable twin of one escnn module (of the kinds the scripts use: R2Conv, ReLU, PointwiseMaxPool2D,
    GroupPooling, SequentialModule of those)."""
    kind = _TRACED.get(type(module))
    if kind is None:
        known = ", ".join(t.__name__ for t in _TRACED)
        raise NotImplementedError(f"there is no traceable twin of escnn's {type(module).__name__} yet (there are of "
                                  f"{known}); add one to cleanrl_equi/traceable.py")
    return kind(module)


# ---- Whole networks ---------------------------------------------------------------------------------------------------


def traceable(network: nn.Module) -> nn.Module:
    """The traceable twin of `network`: the same module tree and classes (so the network's own methods run on it),
    each escnn layer replaced by its traced twin, sharing every parameter and buffer with `network`. A network
    without escnn layers is returned as it is (it traces as it is).

    The twin's modules are shallow copies: switching its mode leaves `network`'s alone, and EscnnModule's mode check
    (eval mode refuses gradients because escnn's cached filters would go stale) is dropped, since the twin caches
    no filter."""
    if not _holds_escnn(network):
        return network
    return _twin(network)


def _twin(module: nn.Module) -> nn.Module:
    if isinstance(module, enn.EquivariantModule):
        return traced_layer(module)
    twin = copy.copy(module)
    for key, value in vars(module).items():  # own containers: parameters, buffers, children, hooks
        if key.startswith("_") and isinstance(value, (dict, set)):
            twin.__dict__[key] = copy.copy(value)
    for name, child in module._modules.items():
        twin._modules[name] = None if child is None else _twin(child)
    if isinstance(twin, EscnnModule):
        twin._forward_pre_hooks = type(twin._forward_pre_hooks)(
            (k, hook) for k, hook in twin._forward_pre_hooks.items() if hook is not EscnnModule._check_mode)
        twin._born_buffers = False
    return twin


# escnn network -> its twin, so that every function sent through the twins shares one twin per network
_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def twin_of(network: nn.Module) -> nn.Module:
    """`traceable(network)`, built once per network."""
    if network not in _TWINS:
        _TWINS[network] = traceable(network)
    return _TWINS[network]


def through_traced(fn: Callable, *networks: nn.Module) -> Callable:
    """`fn` called with each of `networks` among its arguments replaced by its traceable twin (`twin_of`). The twins
    share the networks' parameters, so an optimizer step inside `fn` updates the networks, and the caller keeps
    passing, saving and evaluating the escnn networks. Wrap the compiled function (`through_traced(compiled(...))`):
    the swap happens before dynamo sees the arguments."""
    twins = {id(network): (network, twin_of(network)) for network in networks}  # the network is kept alive with its id

    def swap(value):
        held = twins.get(id(value)) if isinstance(value, nn.Module) else None
        return value if held is None else held[1]

    def call(*args, **kwargs):
        return fn(*[swap(a) for a in args], **{k: swap(v) for k, v in kwargs.items()})
    return call
