"""What the compiled path (`--compile`, `--cudagraphs`) needs besides torch.compile: the choice of eager, compiled or
CUDA-graphed functions, a learning rate that can change without recompiling, and for the equivariant scripts a
plain-torch copy of an escnn network to act through.

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
that is slower than eager (benchmarks/results/compile_speed_cpu_*.csv): `--compile` pays for the plain networks.
"""

from __future__ import annotations

import atexit
import copy
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_map

from cleanrl_equi.errors import fail


def compiled(fn: Callable, args: Any) -> Callable:
    """`fn` as the run asks for it: as it is (eager), through torch.compile (`--compile`), or through torch.compile
    with CUDA graphs (`--cudagraphs`, inductor's "reduce-overhead" mode: a whole step is replayed as one recorded
    graph instead of one kernel launch per operation, which is what small RL networks lose their time to on a GPU).

    A recorded graph writes its outputs into the same memory at every replay, so under `--cudagraphs` the outputs
    are cloned before they are handed back: a caller may keep them (PPO keeps each minibatch's statistics)."""
    if args.compile or args.cudagraphs:
        atexit.register(_drop_compiled_code)
    if args.cudagraphs:
        graph = torch.compile(fn, mode="reduce-overhead")

        def replay(*fn_args, **fn_kwargs):
            torch.compiler.cudagraph_mark_step_begin()
            return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, graph(*fn_args, **fn_kwargs))
        replay._orig_mod = fn  # what `refresh` writes into when `fn` is a plain copy
        return replay
    return torch.compile(fn) if args.compile else fn


def _drop_compiled_code() -> None:
    """Forget what torch.compile compiled, at exit (registered once per compiled function; repeats are no-ops). Its
    caches hold the script's globals (the vector env among them) until the interpreter's very end, after ale-py's
    bindings are torn down, which then print a page of "leaked instance" warnings."""
    torch._dynamo.reset()


def with_bf16_autocast(fn: Callable, args: Any, device: torch.device) -> Callable:
    """`fn` run under bfloat16 autocast when `--bf16` is on (else `fn` itself): convolutions and matrix products
    in bfloat16, everything autocast keeps in float32 (losses, softmax, log) in float32. A network's heads return
    float32 (`.float()`), so log-probabilities, Q values, targets and losses stay float32. Wrapping the whole update
    step leaves its body free of precision code, so deleting the `# SPEED` lines of a script leaves it eager."""
    if not args.bf16:
        return fn

    def in_bf16(*fn_args, **fn_kwargs):
        with torch.autocast(device.type, torch.bfloat16):
            return fn(*fn_args, **fn_kwargs)
    return in_bf16


def channels_last(batch: dict, keys: tuple[str, ...] = ("obs", "next_obs")) -> dict:
    """The batch with its images in channels-last memory order: the same numbers, 15-30% faster convolutions on a
    CPU (measured in benchmarks/update_layout.py)."""
    return {k: v.contiguous(memory_format=torch.channels_last) if k in keys else v for k, v in batch.items()}


def check_compile_flags(args: Any, device: torch.device) -> None:
    """`--cudagraphs` records CUDA graphs of the compiled steps: it implies `--compile` and needs a CUDA device (one
    sentence where there is none)."""
    if args.cudagraphs:
        if device.type != "cuda":
            fail("--cudagraphs records CUDA graphs and needs a CUDA GPU, and this run is on the CPU "
                 "(no GPU visible, or --no-cuda); use --compile instead.")
        args.compile = True


def learning_rate(lr: float, args: Any, device: torch.device) -> float | torch.Tensor:
    """The learning rate to build an optimizer with. On the compiled path a 0-d tensor on the device: a float
    learning rate is a constant of the compiled optimizer step, so annealing it would recompile the step at every
    change, while a tensor's value is read at each call. Eager keeps the float."""
    return torch.tensor(lr, device=device) if args.compile else lr


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, args: Any) -> None:
    """Set every parameter group's learning rate: in place on the compiled path (see `learning_rate`; a resumed
    optimizer state may bring the other kind, which is converted here)."""
    for group in optimizer.param_groups:
        if not args.compile:
            group["lr"] = float(lr)
        elif isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = torch.tensor(lr, device=group["params"][0].device)


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
    from cleanrl_equi.equivariant import enn  # here: the plain scripts need not import escnn

    if not any(isinstance(m, enn.EquivariantModule) for m in network.modules()):
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
    from cleanrl_equi.equivariant import enn

    return any(isinstance(m, enn.EquivariantModule) for m in module.modules())


def _export_children(twin: nn.Module, network: nn.Module) -> None:
    from cleanrl_equi.equivariant import TensorToField, enn

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
    from cleanrl_equi.equivariant import TensorToField, enn

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
