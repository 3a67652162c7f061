"""escnn building blocks for the equivariant scripts: the tensor-to-field boundary, field types of actions, and the
module base that owns escnn's train/eval rules, and the plain-torch copy of an escnn network that the compiled path
(`--compile`) acts through (`plain_copy`, `refresh`; see "Plain-torch copies" below).

Conventions (escnn's, checked in tests): for a gspace on the plane, the last tensor axis (image columns) is +x
and the second-to-last axis, read upwards, is +y; positive rotations are counter-clockwise on screen.
`flip2dOnR2()` mirrors left-right (reverses columns), `flip2dOnR2(axis=0.)` mirrors top-bottom (reverses rows).

Importing this module also replaces escnn's weight-initialisation variance computation by an exact vectorised
equivalent (see `he_init_variances`): escnn computes it in a Python loop over every basis element, which took
about 10 s of the 18 s needed to build the C8 actor and critic of the manipulation scripts on one CPU core.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import Counter, defaultdict
from typing import Sequence

import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*py3nj", category=UserWarning)
# importers take escnn's `nn` from here (`from cleanrl_equi.equivariant import enn`), with that warning silenced
import escnn.nn.init as _escnn_init  # noqa: E402
from escnn import gspaces  # noqa: E402
from escnn import nn as enn  # noqa: E402

# Buffers an escnn layer fills with its expanded filter and bias in eval mode (and holds, zero, right after it is
# built). They are a cache of the parameters, never part of a checkpoint.
_FILTER_CACHE = (".filter", ".expanded_bias")


class EscnnModule(nn.Module):
    """Base of every network that contains escnn layers. It keeps escnn's two modes safe without the caller's care:

    - train mode rebuilds each layer's dense filter from its basis coefficients at every forward pass (gradients
      reach the coefficients; nothing goes stale); eval mode expands the filters once, on entering eval mode, and
      reuses them (fast acting and evaluation). Mode switches run outside autograd, so the cache holds no graph.
    - a forward pass in eval mode with gradients enabled is refused: the cached filters do not follow weight updates.
    - `state_dict` holds parameters only, in either mode, and `load_state_dict` accepts that form in either mode
      (refreshing the cached filters in eval mode), so a checkpoint never depends on the mode it was saved in.
    """

    def __init__(self):
        super().__init__()
        self._born_buffers = True  # escnn layers are built holding zero filter buffers, even in train mode
        self.register_forward_pre_hook(EscnnModule._check_mode)

    @staticmethod
    def _check_mode(module: "EscnnModule", inputs) -> None:
        if not module.training and torch.is_grad_enabled():
            raise RuntimeError(f"{type(module).__name__} is in eval mode, where escnn reuses filters expanded "
                               "before the last weight update; call .train() before computing gradients.")
        if module.training and module._born_buffers:  # once dropped, only eval mode brings them back (and train
            nn.Module.train(module, True)              # mode drops them again), so the first forward is enough
            module._born_buffers = False

    def train(self, mode: bool = True):
        with torch.no_grad():
            return super().train(mode)

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        for key in [k for k in state if k.endswith(_FILTER_CACHE)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.endswith(_FILTER_CACHE)]
        unexpected = [k for k in result.unexpected_keys if not k.endswith(_FILTER_CACHE)]
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing}, "
                               f"unexpected keys {unexpected}")
        if not self.training:  # the cached filters were expanded from the old weights
            self.train()
            self.eval()
        return result


class TensorToField(nn.Module):
    """The model boundary: wrap a plain tensor as a GeometricTensor of `field_type`, so escnn layers (which check
    their input type) can follow, while the rest of the script keeps passing ordinary tensors."""

    def __init__(self, field_type: enn.FieldType):
        super().__init__()
        self.field_type = field_type

    def forward(self, x: torch.Tensor) -> enn.GeometricTensor:
        return enn.GeometricTensor(x, self.field_type)


def mirror_gspace(axis: str) -> gspaces.GSpace2D:
    """The reflection group acting on images: "left-right" reverses the width axis, "top-bottom" the height axis."""
    if axis == "left-right":
        return gspaces.flip2dOnR2()
    if axis == "top-bottom":
        return gspaces.flip2dOnR2(axis=0.0)
    raise ValueError(f"unknown mirror axis {axis!r}; use 'left-right' or 'top-bottom'.")


def discrete_action_type(gspace: gspaces.GSpace2D, permutation: Sequence[int]) -> tuple[enn.FieldType, list[int]]:
    """Field type for the logits of a discrete action set on which a reflection acts by `permutation`.

    An action the mirror leaves alone (NOOP, FIRE) is a trivial field: its logit must not change. A swapped pair
    (RIGHT, LEFT) is one regular field of the two-element group: the mirror exchanges its two channels, exactly as
    it exchanges the two actions. The field type lists the self-mirrored actions first and the pairs after; the
    returned index list reorders those channels into the game's action order (logits = head_out[:, order]).
    """
    fixed = [a for a, b in enumerate(permutation) if a == b]
    pairs = [(a, b) for a, b in enumerate(permutation) if a < b]
    if any(permutation[permutation[a]] != a for a in range(len(permutation))):
        raise ValueError(f"{list(permutation)} is not a mirror (an involution) of the action set")
    field_type = enn.FieldType(gspace, len(fixed) * [gspace.trivial_repr] + len(pairs) * [gspace.regular_repr])
    channel_actions = fixed + [action for pair in pairs for action in pair]
    order = [channel_actions.index(action) for action in range(len(permutation))]
    return field_type, order


def planar_action_type(gspace: gspaces.GSpace2D, n_invariant: int) -> enn.FieldType:
    """Field type for a continuous action (dx, dy, *invariant): (dx, dy) moves with the plane (the rotation/flip
    acting on vectors), every other component is unchanged by the symmetry (gripper, dz, dtheta, log-stds)."""
    return enn.FieldType(gspace, [gspace.basespace_action] + n_invariant * [gspace.trivial_repr])


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (for escnn layers: the basis coefficients, not the expanded filters)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---- Plain-torch copies for the compiled path -------------------------------------------------------------------------
# Why a copy: torch.compile (dynamo) cannot trace escnn's layers. Every escnn module's forward asserts that its input
# has the expected `FieldType` (a comparison of Python objects that hold NumPy arrays), and the basis expansion that
# builds a filter from its coefficients calls `.item()` and NumPy; dynamo splits the graph there and runs each escnn
# layer eagerly, so compiling an escnn network as it is gains nothing. In eval mode an escnn layer is only a
# convolution with a fixed, already expanded filter, which is what escnn's own `EquivariantModule.export()` turns it
# into (`R2Conv` -> `nn.Conv2d`, `ReLU` -> `nn.ReLU`, ...). `plain_copy` builds that copy of a whole network once;
# `refresh` copies the current filters into it (in place, so the compiled graph stays valid) after each update. The
# copy computes exactly what the escnn network computes in eval mode.
#
# The update step cannot go through a copy (its gradients must reach escnn's basis coefficients), so it is compiled
# as it is: the loss, backward and optimizer step are compiled and the escnn layers in between run eagerly. On a CPU
# that is slower than eager (benchmarks/results/compile_speed_cpu_*.csv): `--compile` pays for the plain networks.


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
    export, the TensorToField boundary by a `PlainField` wrapper, at any depth (an actor's encoder is a child module
    holding escnn layers); the network's own methods run on it unchanged. A network without escnn layers is returned
    as it is (it compiles as it is). The global RNG is left as it was (the exported layers are built with a random
    initialisation that `refresh` overwrites)."""
    if not _holds_escnn(network):
        return network
    training = network.training
    twin = copy.deepcopy(network)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        _export_children(twin, network)
    network.train(training)  # export() left the escnn layers in eval mode
    nn.Module.train(twin, False)
    refresh(twin, network)
    return twin.requires_grad_(False)


def _holds_escnn(module: nn.Module) -> bool:
    return any(isinstance(m, enn.EquivariantModule) for m in module.modules())


def _export_children(twin: nn.Module, network: nn.Module) -> None:
    for name, child in list(network.named_children()):
        if isinstance(child, enn.EquivariantModule):
            setattr(twin, name, _Exported(child.export()))
        elif isinstance(child, TensorToField):
            setattr(twin, name, _ToPlainField())
        elif _holds_escnn(child):
            _export_children(getattr(twin, name), child)


def refresh(twin: nn.Module, network: nn.Module) -> None:
    """Copy the current weights of `network` into its plain copy `twin` (or a torch.compile of it) in place: each
    R2Conv's filter and bias, expanded from its coefficients as escnn does in eval mode. In either mode of
    `network`; call it after each update."""
    twin = getattr(twin, "_orig_mod", twin)
    if twin is network:
        return
    with torch.no_grad():
        _refresh_children(twin, network)


def _refresh_children(twin: nn.Module, network: nn.Module) -> None:
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
        elif isinstance(child, TensorToField):
            continue
        elif _holds_escnn(child):
            _refresh_children(getattr(twin, name), child)
        else:
            getattr(twin, name).load_state_dict(child.state_dict())


# ---- Fast weight initialisation ---------------------------------------------------------------------------------------
_escnn_he_init_variances = _escnn_init._generalized_he_init_variances


def he_init_variances(expansion) -> torch.Tensor:
    """The per-coefficient scale of escnn's generalised He initialisation, identical to escnn's own result.

    escnn scales basis coefficient w by 1 / sqrt(n_in(o) * n_basis(in irrep, o)), where o is the output irrep the
    coefficient feeds, n_in(o) the number of distinct input irrep types feeding o and n_basis the number of
    coefficients linking that input irrep type to o. All of it depends on the output field only through its type
    and irrep index, so it is computed once per pair of field types and repeated over the pairs of fields, in
    escnn's coefficient order (pair of types, then output field, then input field, then the block's basis).
    """
    try:
        pairs, in_reprs, out_reprs = expansion._representations_pairs, expansion._in_reprs, expansion._out_reprs
        blocks = {pair: list(getattr(expansion, f"block_expansion_{expansion._escape_pair(pair)}").get_basis_info())
                  for pair in pairs}
    except AttributeError:  # not a blocks expansion: escnn's own loop
        return _escnn_he_init_variances(expansion)
    n_in = Counter(r.name for r in in_reprs)
    n_out = Counter(r.name for r in out_reprs)
    inputs, counts = defaultdict(set), Counter()
    for (in_name, out_name), attrs in blocks.items():
        for attr in attrs:
            inputs[out_name, attr["out_irrep_idx"]].add(attr["in_irrep"])
            counts[attr["in_irrep"], out_name, attr["out_irrep_idx"]] += n_in[in_name]
    parts = []
    for in_name, out_name in pairs:
        block = torch.tensor([1.0 / math.sqrt(len(inputs[out_name, a["out_irrep_idx"]])
                                              * counts[a["in_irrep"], out_name, a["out_irrep_idx"]])
                              for a in blocks[in_name, out_name]])
        parts.append(block.repeat(n_out[out_name] * n_in[in_name]))
    return torch.cat(parts)


_escnn_init._generalized_he_init_variances = he_init_variances
