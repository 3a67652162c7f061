"""What the compiled path (`--compile`, `--cudagraphs`) needs besides torch.compile: the choice of eager, compiled or
CUDA-graphed functions, an optimizer whose learning rate can change without recompiling, bfloat16 autocast around a
whole step, and channels-last batches. (The plain-torch copy that an equivariant network acts through on the compiled
path is made where those networks are: `plain_copy` and `refresh` in `cleanrl_equi.equivariant`.)

A script applies these on lines of their own, tagged `# SPEED` (`update = compiled(update, args)  # SPEED`), so that
deleting those lines leaves the eager algorithm.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from typing import Any, Callable

import torch
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
        _quiet_compile_warnings()
    if args.cudagraphs:
        graph = torch.compile(fn, mode="reduce-overhead")

        def replay(*fn_args, **fn_kwargs):
            torch.compiler.cudagraph_mark_step_begin()
            return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, graph(*fn_args, **fn_kwargs))
        replay._orig_mod = fn  # what `refresh` writes into when `fn` is a plain copy
        return replay
    return torch.compile(fn) if args.compile else fn


def _quiet_compile_warnings() -> None:
    """Two warnings torch.compile prints on CPU runs, neither about anything the user can act on: a CUDA toolkit found
    on a machine without a GPU (inductor looks for one), and the profiler markers in the optimizer's step, which
    dynamo leaves out (they only label the step for a profiler). Errors still show."""
    for name in ("torch.utils.cpp_extension", "torch._dynamo.variables.ctx_manager", "torch._dynamo.variables.torch"):
        logging.getLogger(name).setLevel(logging.ERROR)


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


def prepare_optimizer(optimizer: torch.optim.Optimizer, args: Any, device: torch.device) -> None:
    """Make a freshly built optimizer what the compiled steps need (eager: nothing changes): each group's learning
    rate a 0-d tensor on the device (`learning_rate`), and on a GPU Adam's step counts kept on the device as well
    (`capturable`), so that a compiled or CUDA-graphed optimizer step never reads them back to the host."""
    if not args.compile:
        return
    for group in optimizer.param_groups:
        if "capturable" in group and device.type == "cuda":
            group["capturable"] = True
    set_learning_rate(optimizer, optimizer.param_groups[0]["lr"], args)


# optimizer -> the 0-d learning-rate tensor of each of its groups on the compiled path (see `set_learning_rate`)
_LR_TENSORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float | torch.Tensor, args: Any) -> None:
    """Set every parameter group's learning rate. On the compiled path each group keeps one 0-d tensor for its whole
    life, filled in place, whatever the group holds when this is called: the float that CleanRL's line
    `optimizer.param_groups[0]["lr"] = lrnow` has just put there, or a resumed optimizer state's own value. A new
    float would recompile the compiled optimizer step, and a new tensor would make a CUDA graph record itself again."""
    lr = float(lr)
    if not args.compile:
        for group in optimizer.param_groups:
            group["lr"] = lr
        return
    tensors = _LR_TENSORS.setdefault(optimizer, {})
    for index, group in enumerate(optimizer.param_groups):
        if index not in tensors:
            held, device = group["lr"], group["params"][0].device
            tensors[index] = held if isinstance(held, torch.Tensor) else torch.tensor(lr, device=device)
        group["lr"] = tensors[index].fill_(lr)
