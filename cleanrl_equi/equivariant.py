"""escnn building blocks shared by the equivariant scripts, and an exact equivariance check.

Conventions (escnn's, checked in tests): for a gspace on the plane, the last tensor axis (image columns) is +x
and the second-to-last axis, read upwards, is +y; positive rotations are counter-clockwise on screen.
`flip2dOnR2()` mirrors left-right (reverses columns), `flip2dOnR2(axis=0.)` mirrors top-bottom (reverses rows).
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*py3nj", category=UserWarning)
# importers take escnn's `nn` from here (`from cleanrl_equi.equivariant import enn`), with that warning silenced
from escnn import gspaces  # noqa: E402
from escnn import nn as enn  # noqa: E402


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


def max_equivariance_error(
    fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    group_actions: Sequence[tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]],
) -> float:
    """Largest |fn(g·x) - g·fn(x)| over the inputs and every group element g.

    `group_actions` lists, for each element g, (how g acts on the input, how g acts on the output). Use only
    elements that act exactly on the pixel grid (flips, multiples of 90°), so the check holds to float error and
    does not need escnn's own `check_equivariance` (which downloads an image and interpolates).
    """
    with torch.no_grad():
        reference = fn(inputs)
        errors = [
            (fn(act_on_input(inputs)) - act_on_output(reference)).abs().max().item()
            for act_on_input, act_on_output in group_actions
        ]
    return max(errors)


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (for escnn layers: the basis coefficients, not the expanded filters)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
