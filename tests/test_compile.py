"""The compiled path (`--compile`) is the same algorithm: for each script, a few update steps run eagerly and through
torch.compile from the same weights, optimizer state, seed and data give the same losses and weights (the compiled
steps, as under `--compile`, through the traceable twins of the escnn networks: `cleanrl_equi.traceable`); the plain
copy an escnn network acts through computes what the network computes; and a short real `--compile` run trains and
logs its scalars.

Tolerance: inductor fuses the float32 arithmetic and reorders sums (reductions, matrix products), so the compiled
results differ from eager by rounding. Measured on CPU over the steps below: at most 2.3e-8 absolute on every
output and weight (relative differences reach 1e-2 only on statistics near zero, such as an approx_kl of 1e-6). The
tests allow 1e-6 absolute + 1e-4 relative: 40x the rounding seen, far below any change of the algorithm (a wrong
coefficient, a missing term or a skipped optimizer step moves the losses by percents). Random draws inside a compiled function
(RPO's noise on the mean) come from inductor's own generator unless `fallback_random` is set, which the RPO test
sets so that both paths draw the same noise.

Compiling on two CPU cores is slow: this file takes about 2 minutes with an empty inductor cache and 45 s with a
warm one (`-n 0` on 2 busy cores; most of it in inductor's C++ builds).
"""

import copy

import numpy as np
import pytest
import torch
import torch._dynamo
import torch._inductor.config

from cleanrl_equi.compile import compiled, learning_rate, prepare_optimizer, set_learning_rate, with_bf16_autocast
from cleanrl_equi.equivariant import plain_copy, refresh
from cleanrl_equi.traceable import through_traced
from conftest import load_script, only_run_dir, read_scalars, run_script

RTOL, ATOL = 1e-4, 1e-6
STEPS = 3


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def statistics(result) -> list[torch.Tensor]:
    """An update step's statistics as a list: the values of the dict it returns (or the tensors of a tuple)."""
    return list(result.values()) if isinstance(result, dict) else list(result)


def run_updates(step, state: dict, batches: list, seed: int = 0) -> list[list[torch.Tensor]]:
    """Call `step(**state, **batch)` for each batch from `seed`; returns each call's outputs (detached tensors)."""
    torch.manual_seed(seed)
    outputs = []
    for batch in batches:
        result = step(**state, **batch)
        outputs.append([t.detach().clone() for t in statistics(result)])
    return outputs


def assert_same_updates(step, make_state, batches, seed: int = 0) -> None:
    """The eager and compiled `step` from two identical copies of the state give the same outputs and weights. The
    compiled step gets the traceable twins of the state's escnn networks, as the scripts' compiled updates do."""
    eager_state, compiled_state = make_state(), make_state()
    eager = run_updates(step, eager_state, batches, seed)
    networks = [v for v in compiled_state.values() if isinstance(v, torch.nn.Module)]
    compiled_step, calls = through_traced(torch.compile(step), *networks), iter(range(len(batches)))

    def no_recompile(**kwargs):  # after the second call (the first change of a guard may specialise once)
        with torch._dynamo.config.patch(error_on_recompile=next(calls) > 1):
            return compiled_step(**kwargs)
    compiled = run_updates(no_recompile, compiled_state, batches, seed)
    for i, (a, b) in enumerate(zip(eager, compiled)):
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=RTOL, atol=ATOL, msg=lambda m: f"update {i + 1}: {m}")
    for (name, p), q in zip(eager_state[next(iter(eager_state))].named_parameters(),
                            compiled_state[next(iter(compiled_state))].parameters()):
        torch.testing.assert_close(q, p, rtol=RTOL, atol=ATOL, msg=lambda m: f"weights {name}: {m}")


def ppo_state(module, args, **agent_kwargs):
    torch.manual_seed(1)
    agent = module.Agent(**agent_kwargs) if agent_kwargs else module.Agent(args)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    agent.train()

    def make():
        twin = copy.deepcopy(agent)
        opt = torch.optim.Adam(twin.parameters(), lr=args.learning_rate, eps=1e-5)
        opt.load_state_dict(optimizer.state_dict())
        return {"agent": twin, "optimizer": opt, "args": args}
    return make


def ppo_batches(obs_fn, action_fn, n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    return [{"obs": obs_fn(g, n), "actions": action_fn(g, n), "logprobs": -torch.rand(n, generator=g) - 1.0,
             "advantages": torch.randn(n, generator=g), "returns": torch.randn(n, generator=g),
             "values": torch.randn(n, generator=g)} for _ in range(STEPS)]


def frames(g, n):
    return torch.randint(0, 256, (n, 4, 84, 84), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("name", ["ppo_atari", "ppo_atari_equi"])
def test_ppo_atari_update_compiles_to_the_same_losses(name):
    module = load_script(name)
    args = module.Args(env_id="BreakoutNoFrameskip-v4")
    batches = ppo_batches(frames, lambda g, n: torch.randint(0, 4, (n,), generator=g))
    assert_same_updates(module.update_step, ppo_state(module, args), batches)


def test_rpo_update_compiles_to_the_same_losses():
    module = load_script("rpo_mujoco")
    args = module.Args()
    make = ppo_state(module, args, obs_dim=11, action_dim=3, rpo_alpha=0.5)
    batches = ppo_batches(lambda g, n: torch.randn(n, 11, generator=g), lambda g, n: torch.randn(n, 3, generator=g))
    with torch._inductor.config.patch(fallback_random=True):  # the same U(-alpha, alpha) draws as eager
        assert_same_updates(module.update_step, make, batches)


@pytest.mark.parametrize("model", ["equi", "cnn"])
def test_dqn_update_compiles_to_the_same_losses(model):
    module = load_script("dqn_equi_bullet")
    args = module.Args(model=model, n_hidden=8, image_size=16)
    torch.manual_seed(1)
    q_network = module.make_q_network(args)
    target = copy.deepcopy(q_network).requires_grad_(False)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate)

    def make():
        q, t = copy.deepcopy(q_network), copy.deepcopy(target)
        opt = torch.optim.Adam(q.parameters(), lr=args.learning_rate)
        opt.load_state_dict(optimizer.state_dict())
        return {"q_network": q, "target_network": t, "optimizer": opt, "args": args}

    g = torch.Generator().manual_seed(3)
    n = 8
    batches = [{"data": {"obs": torch.rand(n, 2, 16, 16, generator=g), "next_obs": torch.rand(n, 2, 16, 16, generator=g),
                         "actions": torch.randint(0, module.NUM_ACTIONS, (n,), generator=g),
                         "rewards": torch.rand(n, generator=g), "terminated": (torch.rand(n, generator=g) < 0.2).float()}}
               for _ in range(STEPS)]
    assert_same_updates(module.update_step, make, batches)


def test_plain_copy_acts_as_the_escnn_network():
    """The acting copy of the equivariant PPO network gives exactly the eval-mode escnn outputs, before and after the
    weights change, and through torch.compile to float tolerance; building it leaves the RNG and the mode alone."""
    module = load_script("ppo_atari_equi")
    torch.manual_seed(1)
    agent = module.Agent(module.Args(env_id="PongNoFrameskip-v4"))
    rng = torch.random.get_rng_state()
    twin = plain_copy(agent)
    assert torch.equal(rng, torch.random.get_rng_state()) and agent.training
    obs = torch.randint(0, 256, (6, 4, 84, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    policy = torch.compile(twin.get_action_and_value)
    # the weight change draws from its own generator: the compiled sampler draws its seeds from the global one
    g = torch.Generator().manual_seed(4)
    for change in range(2):
        if change:
            with torch.no_grad():
                for p in agent.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        agent.eval()
        refresh(twin, agent)
        with torch.no_grad():
            hidden_ref = agent.network(agent.input(obs / 255.0)).tensor
            hidden = twin.network(twin.input(obs / 255.0)).tensor
            assert torch.equal(hidden, hidden_ref)
            assert torch.equal(twin.get_value(obs), agent.get_value(obs))
            _, _, _, value = policy(obs)  # the actions are sampled: compare the values, which do not depend on them
            torch.testing.assert_close(value, agent.get_value(obs), rtol=RTOL, atol=ATOL)
        agent.train()


def test_plain_network_is_its_own_copy():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert plain_copy(net) is net
    refresh(net, net)  # nothing to do


def test_compiled_training_run_logs_scalars(workdir):
    """A short real `ppo_atari.py --compile --bf16` run trains and writes CleanRL's scalars, and runs quietly (the
    compiled code's caches, which hold the env, are dropped before ale-py's bindings report it as leaked)."""
    proc = run_script("ppo_atari.py", "--compile", "--bf16", "--no-cuda", "--num-envs", "2", "--num-steps", "32", "--num-minibatches",
               "2", "--update-epochs", "1", "--total-timesteps", "128", cwd=workdir, timeout=900)
    assert "leaked" not in proc.stdout + proc.stderr
    # nor torch.compile's warnings that say nothing the user can act on (a CUDA toolkit without a GPU; the
    # optimizer's profiler markers left out of the graph)
    assert "will be ignored" not in proc.stderr and "No CUDA runtime" not in proc.stderr, proc.stderr
    scalars = read_scalars(only_run_dir(workdir))
    assert len(scalars["losses/value_loss"]) == 2
    for tag in ("losses/policy_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac", "charts/SPS"):
        assert all(np.isfinite(v) for _, v in scalars[tag]), tag


def test_annealed_learning_rate_does_not_recompile():
    """On the compiled path the learning rate is a tensor changed in place (`prepare_optimizer`, then the script's
    CleanRL line `optimizer.param_groups[0]["lr"] = lrnow` followed by `set_learning_rate`): annealing it between
    updates neither recompiles the optimizer step (a float rate would, at every change) nor changes the algorithm
    (the same losses and weights as eager with the float rate), and the group keeps one tensor throughout (a new
    one would make a CUDA graph record itself again)."""
    module = load_script("ppo_atari")
    args = module.Args(env_id="BreakoutNoFrameskip-v4")
    eager_args, compiled_args = copy.copy(args), copy.copy(args)
    compiled_args.compile = True
    state = ppo_state(module, args)
    eager, fast = state(), state()
    prepare_optimizer(eager["optimizer"], eager_args, torch.device("cpu"))
    prepare_optimizer(fast["optimizer"], compiled_args, torch.device("cpu"))
    assert isinstance(eager["optimizer"].param_groups[0]["lr"], float)
    lr_tensor = fast["optimizer"].param_groups[0]["lr"]
    assert isinstance(lr_tensor, torch.Tensor) and lr_tensor.item() == pytest.approx(args.learning_rate)
    # A few steps, as in the tests above: rounding differences grow over many steps (measured: with 8-sample batches,
    # six annealed updates part some weights by 1.6e-4, while every single step, from equal weights, agrees to 1e-5)
    batches = ppo_batches(frames, lambda g, n: torch.randint(0, 4, (n,), generator=g), n=16) * 2
    step = torch.compile(module.update_step)
    for i, batch in enumerate(batches[:4]):
        lr = args.learning_rate * (1 - i / 4)
        for optimizer, run_args in ((eager["optimizer"], eager_args), (fast["optimizer"], compiled_args)):
            optimizer.param_groups[0]["lr"] = lr
            set_learning_rate(optimizer, lr, run_args)
        assert fast["optimizer"].param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(lr)
        expected = module.update_step(**eager, **batch)
        with torch._dynamo.config.patch(error_on_recompile=i > 1):  # the first change of a guard may specialise
            got = step(**fast, **batch)
        for x, y in zip(statistics(expected), statistics(got)):
            torch.testing.assert_close(y, x, rtol=RTOL, atol=ATOL, msg=lambda m: f"update {i + 1}: {m}")
    for p, q in zip(eager["agent"].parameters(), fast["agent"].parameters()):
        torch.testing.assert_close(q, p, rtol=RTOL, atol=ATOL)


def test_learning_rate_tensor_of_a_fresh_optimizer_and_of_a_resumed_one():
    """`learning_rate` builds an optimizer with a tensor rate on the compiled path, which `set_learning_rate` then
    fills in place; an optimizer whose state brought a float (a resumed eager run) gets a tensor at the first call."""
    compiled_args = type("A", (), {"compile": True})()
    weight = torch.nn.Parameter(torch.zeros(2))
    built = torch.optim.Adam([weight], lr=learning_rate(1e-3, compiled_args, torch.device("cpu")))
    held = built.param_groups[0]["lr"]
    set_learning_rate(built, 5e-4, compiled_args)
    assert built.param_groups[0]["lr"] is held and held.item() == pytest.approx(5e-4)
    resumed = torch.optim.Adam([weight], lr=1e-3)
    set_learning_rate(resumed, 5e-4, compiled_args)
    first = resumed.param_groups[0]["lr"]
    assert isinstance(first, torch.Tensor) and first.item() == pytest.approx(5e-4)
    resumed.param_groups[0]["lr"] = 2e-4
    set_learning_rate(resumed, 2e-4, compiled_args)
    assert resumed.param_groups[0]["lr"] is first and first.item() == pytest.approx(2e-4)


@pytest.mark.parametrize("name", ["ppo_atari", "ppo_atari_equi"])
def test_channels_last_minibatch_gives_the_same_update(name):
    """`--channels-last` (the default) only changes the memory order of the minibatch: the same losses and weights."""
    module = load_script(name)
    args = module.Args(env_id="BreakoutNoFrameskip-v4")
    state = ppo_state(module, args)
    plain, last = state(), state()
    for batch in ppo_batches(frames, lambda g, n: torch.randint(0, 4, (n,), generator=g)):
        expected = module.update_step(**plain, **batch)
        batch["obs"] = batch["obs"].contiguous(memory_format=torch.channels_last)
        for x, y in zip(statistics(expected), statistics(module.update_step(**last, **batch))):
            torch.testing.assert_close(y, x, rtol=RTOL, atol=ATOL)
    for p, q in zip(plain["agent"].parameters(), last["agent"].parameters()):
        torch.testing.assert_close(q, p, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["ppo_atari", "ppo_atari_equi"])
def test_bf16_runs_the_convolutions_in_bfloat16_and_keeps_the_losses_in_float32(name):
    """`--bf16` (the update step wrapped by `with_bf16_autocast`, as the script does): the convolutions compute in
    bfloat16 (seen by a hook), the log-probabilities, losses, gradients and weights stay float32, and the losses are
    those of float32 within bfloat16's rounding (8 bits of mantissa)."""
    module = load_script(name)
    args = module.Args(env_id="BreakoutNoFrameskip-v4")
    bf16_args = copy.copy(args)
    bf16_args.bf16 = True
    state = ppo_state(module, args)
    full, half = state(), state()
    conv_dtypes = []
    for m in half["agent"].modules():
        if isinstance(m, torch.nn.Conv2d) or type(m).__name__ == "R2Conv":
            m.register_forward_hook(lambda mod, inp, out: conv_dtypes.append(getattr(out, "tensor", out).dtype))
    half["args"] = bf16_args
    batch = ppo_batches(frames, lambda g, n: torch.randint(0, 4, (n,), generator=g))[0]
    assert with_bf16_autocast(module.update_step, args, torch.device("cpu")) is module.update_step  # no --bf16
    expected = module.update_step(**full, **batch)
    got = with_bf16_autocast(module.update_step, bf16_args, torch.device("cpu"))(**half, **batch)
    assert conv_dtypes and set(conv_dtypes) == {torch.bfloat16}
    for x, y in zip(statistics(expected), statistics(got)):
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, x, rtol=5e-2, atol=5e-3)
    assert all(p.dtype == torch.float32 for p in half["agent"].parameters())


def test_cudagraphs_without_a_gpu_fails_in_one_sentence(workdir):
    result = run_script("ppo_atari.py", "--cudagraphs", "--no-cuda", "--total-timesteps", "1024", cwd=workdir,
                        check=False)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --cudagraphs") and "Traceback" not in result.stderr


def test_cudagraphs_wrapper_runs_the_same_update_and_hands_back_copies():
    """`compiled(fn, args)` under --cudagraphs: torch.compile in "reduce-overhead" mode, a new replay step marked
    before each call, the outputs cloned (a CUDA graph overwrites its outputs at the next replay). On a CPU inductor
    records no graph and runs the compiled code, so the wrapper's own logic and its numbers are checked here; the
    graphs themselves need a GPU (benchmarks/gpu_compile_speed.sh)."""
    module = load_script("ppo_atari")
    args = module.Args(env_id="BreakoutNoFrameskip-v4")
    graph_args = copy.copy(args)
    graph_args.cudagraphs = graph_args.compile = True
    step = compiled(module.update_step, graph_args)
    assert step._orig_mod is module.update_step
    state = ppo_state(module, args)
    eager, graphed = state(), state()
    for batch in ppo_batches(frames, lambda g, n: torch.randint(0, 4, (n,), generator=g)):
        expected = module.update_step(**eager, **batch)
        got = step(**graphed, **batch)
        for x, y in zip(statistics(expected), statistics(got)):
            torch.testing.assert_close(y, x, rtol=RTOL, atol=ATOL)
    for p, q in zip(eager["agent"].parameters(), graphed["agent"].parameters()):
        torch.testing.assert_close(q, p, rtol=RTOL, atol=ATOL)
