"""The compiled path (`--compile`) of SAC, CQL and IQL is the same algorithm: a few update steps run eagerly and
through torch.compile from the same weights, optimizer state, seed and batches give the same losses and weights
(tolerance and why: tests/test_compile.py), for the equivariant and the CNN networks; and a short real `--compile`
run of each script trains and logs its loss scalars.

The update steps draw random numbers (the policy's samples, CQL's proposals, the CAPS noise): the comparisons set
inductor's `fallback_random`, so that the compiled steps draw them from torch's generator as eager does.

Most of this file's time is compiling (the compiled equivariant steps go through the traceable twins of the escnn
networks, as under `--compile`, and the update's backward and optimizer step still split each step into a few
graphs).
"""

import copy

import numpy as np
import pytest
import torch
import torch._inductor.config

from cleanrl_equi.compile import with_bf16_autocast
from cleanrl_equi.equivariant import plain_copy, refresh
from cleanrl_equi.envs.manipulation.rollouts import tanh_of_mean
from conftest import load_script, only_run_dir, read_scalars, run_script
from test_compile import STEPS, assert_same_updates, fresh_dynamo  # noqa: F401  (fresh_dynamo: autouse fixture)

sac = load_script("sac_equi_bullet")
cql = load_script("cql_equi_offline")
iql = load_script("iql_equi_offline")

SMALL = {"group_order": 4, "n_hidden": 8, "image_size": 32}  # the tiny networks of the script tests
N = 8  # transitions per batch


def flat(outputs) -> tuple:
    """An update step's statistics (a dict, as the scripts return them, or a tuple) as a tuple of tensors."""
    return tuple(outputs.values()) if isinstance(outputs, dict) else tuple(outputs)


def with_networks(step):
    """`step` with a first argument `networks` (every module the step changes), which it ignores: assert_same_updates
    compares the weights of the state's first entry, and so compares them all."""
    def wrapped(networks, **kwargs):
        return flat(step(**kwargs))
    return wrapped


def same_updates(step, base: dict, optimizers, batches) -> None:
    """assert_same_updates of `step` from deep copies of `base` (networks and tensors, copied together so that shared
    ones stay shared) plus the optimizers that `optimizers(copy)` builds for them."""
    def make():
        state = copy.deepcopy(base)
        modules = torch.nn.ModuleList(m for m in state.values() if isinstance(m, torch.nn.Module))
        return {"networks": modules, **state, **optimizers(state)}

    with torch._inductor.config.patch(fallback_random=True):  # the same random draws as eager
        assert_same_updates(with_networks(step), make, batches)


def transitions(g: torch.Generator, expert: bool = False, weights: bool = False) -> dict:
    """A random batch of N transitions at 32 px, as the scripts' buffers and datasets give them."""
    batch = {"obs": torch.rand(N, 2, 32, 32, generator=g), "next_obs": torch.rand(N, 2, 32, 32, generator=g),
             "actions": torch.rand(N, 5, generator=g) * 2 - 1, "rewards": torch.rand(N, generator=g),
             "terminated": (torch.rand(N, generator=g) < 0.2).float()}
    if expert:
        batch["expert"] = torch.arange(N) % 3 == 0
    if weights:
        batch["weights"] = torch.rand(N, generator=g) * 0.9 + 0.1
    return batch


def networks(module, args, *names: str) -> dict:
    """The script's networks for `args` from one seed: actor, critic (+ a target copy), value where asked."""
    torch.manual_seed(1)
    equi = args.model == "equi"
    built = {"actor": module.EquiActor(args) if equi else module.CNNActor(args),
             "critic": module.EquiCritic(args) if equi else module.CNNCritic(args)}
    if "value" in names:
        built["value"] = module.EquiValue(args) if equi else module.CNNValue(args)
    built["critic_target"] = copy.deepcopy(built["critic"]).requires_grad_(False)
    return built


def adam(params, lr):
    """The scripts' Adam, with eps 1e-3 instead of 1e-8. Adam steps each weight by about lr * g / (|g| + eps): a
    gradient that is zero up to rounding (|g| ~ 1e-9, whose sign is the rounding's; the equivariant encoders' last
    layer has many) moves its weight by a good part of lr, eager and compiled each in its own direction (measured:
    up to 1e-3 apart after 3 SAC actor steps at lr 1e-3, while every loss agreed to 1e-7). With eps 1e-3 a weight
    moves with its gradient, not with the rounding, and the weights can be compared at test_compile's tolerance."""
    return torch.optim.Adam(params, lr=lr, eps=1e-3)


@pytest.mark.parametrize("model", ["equi", "cnn"])
def test_sac_updates_compile_to_the_same_losses(model):
    """Critic step (prioritised replay's weights on the equivariant model) and actor step (SACfD's expert term, both
    CAPS terms, alpha) with the script's features handed from one to the other."""
    args = sac.Args(model=model, **SMALL, prioritized_replay=model == "equi", demo_loss_weight=1.0,
                    caps_temporal_weight=0.1, caps_spatial_weight=0.1)
    base = networks(sac, args)
    base["log_alpha"] = torch.tensor([np.log(args.alpha)], dtype=torch.float32, requires_grad=True)
    g = torch.Generator().manual_seed(3)
    data = [transitions(g, expert=True, weights=args.prioritized_replay) for _ in range(STEPS)]

    critic_optimizer = lambda s: {"critic_optimizer": adam(s["critic"].parameters(), args.q_lr)}  # noqa: E731
    critic_state = {k: base[k] for k in ("critic", "actor", "critic_target", "log_alpha")}  # critic first: compared
    same_updates(sac.critic_update_step, {**critic_state, "args": args}, critic_optimizer,
                 [{"data": d} for d in data])

    with torch.no_grad():
        features = [base["critic"].encode(d["obs"]) for d in data]
    actor_optimizers = lambda s: {"actor_optimizer": adam(s["actor"].parameters(), args.policy_lr),  # noqa: E731
                                  "alpha_optimizer": adam([s["log_alpha"]], args.q_lr)}
    actor_state = {k: base[k] for k in ("actor", "critic", "log_alpha")}
    same_updates(sac.actor_update_step, {**actor_state, "args": args}, actor_optimizers,
                 [{"data": d, "features": f} for d, f in zip(data, features)])


@pytest.mark.parametrize("model", ["equi", "cnn"])
def test_cql_update_compiles_to_the_same_losses(model):
    """The whole CQL step: critic with the CQL penalty (the Lagrange multiplier on the equivariant model), actor
    with CAPS, alpha, target."""
    args = cql.Args(model=model, **SMALL, batch_size=N, cql_lagrange=model == "equi", caps_temporal_weight=0.1,
                    caps_spatial_weight=0.1)
    base = networks(cql, args)
    base["log_alpha"] = torch.tensor([np.log(args.alpha)], dtype=torch.float32, requires_grad=True)
    base["log_cql_alpha"] = torch.zeros(1, requires_grad=True)

    def optimizers(s):
        return {"actor_optimizer": adam(s["actor"].parameters(), args.policy_lr),
                "critic_optimizer": adam(s["critic"].parameters(), args.q_lr),
                "alpha_optimizer": adam([s["log_alpha"]], args.alpha_lr),
                "cql_alpha_optimizer": adam([s["log_cql_alpha"]], args.cql_lagrange_lr)}

    g = torch.Generator().manual_seed(3)
    same_updates(cql.update_step, {**base, "args": args}, optimizers,
                 [{"batch": transitions(g)} for _ in range(STEPS)])


@pytest.mark.parametrize("model", ["equi", "cnn"])
def test_iql_update_compiles_to_the_same_losses(model):
    """The whole IQL step: value (expectile), critic, advantage-weighted actor with CAPS, target."""
    args = iql.Args(model=model, **SMALL, batch_size=N, caps_temporal_weight=0.1, caps_spatial_weight=0.1)
    base = networks(iql, args, "value")

    def optimizers(s):
        return {"actor_optimizer": adam(s["actor"].parameters(), args.policy_lr),
                "critic_optimizer": adam(s["critic"].parameters(), args.q_lr),
                "value_optimizer": adam(s["value"].parameters(), args.value_lr)}

    g = torch.Generator().manual_seed(3)
    same_updates(iql.update_step, {**base, "args": args}, optimizers,
                 [{"batch": transitions(g)} for _ in range(STEPS)])


@pytest.mark.parametrize("script", ["sac_equi_bullet", "cql_equi_offline", "iql_equi_offline"])
def test_plain_actor_acts_as_the_escnn_actor(script):
    """The acting network under --compile: the plain copy of the equivariant actor (its escnn layers sit inside the
    encoder, a level down) gives the actor's mean and log-std, and through the compiled evaluation policy its
    tanh(mean), before and after the weights change."""
    module = load_script(script)
    torch.manual_seed(1)
    actor = module.EquiActor(module.Args(**SMALL))
    twin = plain_copy(actor)
    assert not any(type(m).__module__.startswith("escnn") for m in twin.modules())
    policy = torch.compile(tanh_of_mean)
    obs = torch.rand(4, 2, 32, 32, generator=torch.Generator().manual_seed(2))
    for change in range(2):
        if change:
            with torch.no_grad():
                for p in actor.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        refresh(twin, actor)
        actor.eval()
        with torch.no_grad():
            for x, y in zip(twin(obs), actor(obs)):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(policy(twin, obs), tanh_of_mean(actor, obs), rtol=1e-5, atol=1e-6)
        actor.train()


SAC_TINY = ["--group-order", "4", "--n-hidden", "8", "--image-size", "32", "--batch-size", "8", "--learning-starts",
            "8", "--num-envs", "2", "--num-demos", "2", "--max-steps", "6", "--total-timesteps", "16",
            "--eval-frequency", "1000", "--eval-episodes", "1", "--num-eval-envs", "1", "--log-frequency", "2"]
OFFLINE_TINY = ["--group-order", "4", "--n-hidden", "8", "--image-size", "32", "--max-steps", "6", "--batch-size", "4",
                "--eval-episodes", "1", "--num-eval-envs", "1", "--log-frequency", "1", "--total-timesteps", "4",
                "--eval-frequency", "2"]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """Two planner episodes of Block Pulling at 32 px."""
    import cleanrl_equi  # noqa: F401  (registers the tasks)
    from cleanrl_equi.datasets import collect_expert, save_dataset

    path = str(tmp_path_factory.mktemp("data") / "block_pulling_expert.npz")
    save_dataset(path, collect_expert("cleanrl_equi/BlockPulling-v0", 2, seed=0, image_size=32, max_steps=6))
    return path


def assert_trained(workdir: str, tags: list[str], steps: list[int]) -> None:
    scalars = read_scalars(only_run_dir(workdir))
    for tag in tags:
        assert [step for step, _ in scalars[tag]] == steps, tag
        assert all(np.isfinite(v) for _, v in scalars[tag]), tag


def test_compiled_sac_run_logs_its_losses(workdir):
    """SACfD with prioritised replay and CAPS, in bfloat16: the equivariant actor acts through its compiled plain
    copy."""
    run_script("sac_equi_bullet.py", *SAC_TINY, "--compile", "--bf16", "--no-cuda", "--prioritized-replay",
               "--demo-loss-weight", "1", "--caps-temporal-weight", "0.1", cwd=workdir, timeout=900)
    assert_trained(workdir, ["losses/qf1_loss", "losses/actor_loss", "losses/demo_loss", "losses/alpha",
                             "losses/alpha_loss", "losses/caps_temporal", "losses/td_error_mean"], [4, 8, 12, 16])


@pytest.mark.parametrize("script, tags", [
    ("cql_equi_offline.py", ["losses/qf1_loss", "losses/cql1_gap", "losses/actor_loss", "losses/alpha"]),
    ("iql_equi_offline.py", ["losses/qf1_loss", "losses/value_loss", "losses/actor_loss", "losses/log_prob"])])
def test_compiled_offline_run_logs_its_losses(script, tags, tiny_dataset, workdir):
    """The CNN (quicker to compile; the equivariant actor's compiled evaluation policy is checked above, its update
    steps too): four compiled updates in bfloat16, two evaluations through the compiled policy."""
    proc = run_script(script, *OFFLINE_TINY, "--model", "cnn", "--compile", "--bf16", "--no-cuda",
                      "--dataset", tiny_dataset, cwd=workdir, timeout=900)
    assert "eval @ 4 gradient steps" in proc.stdout
    assert_trained(workdir, tags, [1, 2, 3, 4])
    assert [step for step, _ in read_scalars(only_run_dir(workdir))["eval/success_rate"]] == [2, 4]


def conv_output_dtypes(*modules) -> list:
    """Hooks that record the dtype of every convolution's output (plain or escnn) in `modules`."""
    seen = []
    for module in modules:
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d) or type(m).__name__ == "R2Conv":
                m.register_forward_hook(lambda mod, inp, out: seen.append(getattr(out, "tensor", out).dtype))
    return seen


def assert_bf16_step(step, state: dict, args, batch: dict) -> None:
    """`step` with `args.bf16` runs its convolutions in bfloat16, keeps every output and weight float32, and gives
    the float32 step's outputs within bfloat16's rounding (8 bits of mantissa: 5% relative, 0.05 absolute)."""
    full, half = copy.deepcopy(state), copy.deepcopy(state)
    bf16_args = copy.copy(args)
    bf16_args.bf16 = True
    dtypes = conv_output_dtypes(*(m for m in half.values() if isinstance(m, torch.nn.Module)))
    torch.manual_seed(0)
    expected = flat(step(**full, args=args, **batch))
    torch.manual_seed(0)
    got = flat(with_bf16_autocast(step, bf16_args, torch.device("cpu"))(**half, args=bf16_args, **batch))
    assert dtypes and set(dtypes) == {torch.bfloat16}
    for x, y in zip(expected, got):
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, x, rtol=5e-2, atol=5e-2)
    for m in half.values():
        if isinstance(m, torch.nn.Module):
            assert all(p.dtype == torch.float32 for p in m.parameters())


@pytest.mark.parametrize("script", ["sac_equi_bullet", "cql_equi_offline", "iql_equi_offline", "dqn_equi_bullet"])
def test_bf16_runs_the_convolutions_in_bfloat16_and_keeps_the_losses_in_float32(script):
    """`--bf16` of the manipulation scripts (equivariant networks), one update step against float32."""
    module = load_script(script)
    g = torch.Generator().manual_seed(3)
    if script == "dqn_equi_bullet":
        args = module.Args(model="equi", n_hidden=8, image_size=16)
        torch.manual_seed(1)
        q = module.make_q_network(args)
        state = {"q_network": q, "target_network": copy.deepcopy(q).requires_grad_(False)}
        data = {"obs": torch.rand(N, 2, 16, 16, generator=g), "next_obs": torch.rand(N, 2, 16, 16, generator=g),
                "actions": torch.randint(0, module.NUM_ACTIONS, (N,), generator=g),
                "rewards": torch.rand(N, generator=g), "terminated": torch.zeros(N)}

        def step(q_network, target_network, args, data):
            optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate)
            return module.update_step(q_network, target_network, optimizer, args, data)
        assert_bf16_step(step, state, args, {"data": data})
        return
    args = module.Args(model="equi", **SMALL, batch_size=N)
    state = networks(module, args, *(["value"] if script == "iql_equi_offline" else []))
    batch = transitions(g, expert=script == "sac_equi_bullet")
    if script == "sac_equi_bullet":
        def step(actor, critic, critic_target, args, data):
            log_alpha = torch.zeros(1, requires_grad=True)
            critic_stats = module.critic_update_step(actor, critic, critic_target, adam(critic.parameters(), 1e-3),
                                                     log_alpha, args, data)
            actor_stats = module.actor_update_step(actor, critic, adam(actor.parameters(), 1e-3), log_alpha,
                                                   adam([log_alpha], 1e-3), args, data, critic_stats["features"])
            critic_stats.pop("features")  # the encoder's output handed to the actor step (bfloat16 under --bf16)
            return {**critic_stats, **actor_stats}
        assert_bf16_step(step, state, args, {"data": batch})
    elif script == "cql_equi_offline":
        def step(actor, critic, critic_target, args, batch):
            log_alpha, log_cql_alpha = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
            return module.update_step(actor, critic, critic_target, adam(actor.parameters(), 1e-4),
                                      adam(critic.parameters(), 3e-4), log_alpha, adam([log_alpha], 1e-4),
                                      log_cql_alpha, adam([log_cql_alpha], 1e-4), args, batch)
        assert_bf16_step(step, state, args, {"batch": batch})
    else:
        def step(actor, critic, critic_target, value, args, batch):
            return module.update_step(actor, critic, critic_target, value, adam(actor.parameters(), 3e-4),
                                      adam(critic.parameters(), 3e-4), adam(value.parameters(), 3e-4), args, batch)
        assert_bf16_step(step, state, args, {"batch": batch})
