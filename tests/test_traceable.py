"""The traceable twin of every equivariant network (`cleanrl_equi.traceable`): on real observations (Atari frames,
manipulation height maps) it computes what the escnn network computes, in train and in eval mode, with the same
gradients; its state dict is escnn's, and a checkpoint of either loads into the other; dynamo traces it whole (no
graph break) and reuses the graph (no recompile). The compiled updates through the twins are checked against eager in
test_compile.py and test_compile_sac_offline.py; exact equivariance of the escnn networks in test_atari.py and
test_networks.py.

The twin runs escnn's own operations on escnn's own sampled basis, in escnn's order, so eager results are equal bit
for bit; the tests allow 1e-6 (the issue's bound) so that a reordered but exact contraction would still pass.
"""

import io

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from cleanrl_equi.envs.atari import make_atari_envs
from cleanrl_equi.equivariant import enn
from cleanrl_equi.traceable import TracedR2Conv, through_traced, traceable, twin_of
from conftest import load_script, manipulation_observations

ATOL = 1e-6
MANIPULATION = ("sac_equi_bullet", "cql_equi_offline", "iql_equi_offline")
SMALL = {"group_order": 4, "n_hidden": 8, "image_size": 32}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def frames():
    envs = make_atari_envs("BreakoutNoFrameskip-v4", 4, backend="ale")
    obs, _ = envs.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(30):
        obs, *_ = envs.step(rng.integers(0, envs.single_action_space.n, size=4))
    envs.close()
    return torch.as_tensor(obs)


@pytest.fixture(scope="module")
def height_maps():
    return manipulation_observations(image_size=32, steps=2)


def cases(frames, height_maps):
    """(name, escnn network, function of a network giving a tuple of tensors) for every equivariant network of every
    equivariant script, on real observations (actions: fixed random ones)."""
    g = torch.Generator().manual_seed(4)
    actions = torch.rand(len(height_maps), 5, generator=g) * 2 - 1
    ppo = load_script("ppo_atari_equi")
    torch.manual_seed(0)
    agent = ppo.Agent(ppo.Args(env_id="BreakoutNoFrameskip-v4"))
    moves = torch.randint(0, 4, (len(frames),), generator=g)
    yield "ppo_atari_equi Agent", agent, lambda n: (*n.get_action_and_value(frames, moves)[1:], n.get_value(frames))
    dqn = load_script("dqn_equi_bullet")
    yield "dqn_equi_bullet EquiQNetwork", dqn.make_q_network(dqn.Args(n_hidden=8, image_size=32)), \
        lambda n: (n(height_maps),)
    for script in MANIPULATION:
        module = load_script(script)
        args = module.Args(**SMALL)
        yield f"{script} EquiActor", module.EquiActor(args), lambda n: tuple(n(height_maps))
        yield f"{script} EquiCritic", module.EquiCritic(args), lambda n: tuple(n(height_maps, actions))
        if script == "iql_equi_offline":
            yield f"{script} EquiValue", module.EquiValue(args), lambda n: (n(height_maps),)


def all_cases(frames, height_maps):
    return list(cases(frames, height_maps))


@pytest.fixture(scope="module")
def networks(frames, height_maps):
    torch.manual_seed(2)
    return all_cases(frames, height_maps)


def test_every_escnn_layer_of_every_network_has_a_twin(networks):
    for name, network, _ in networks:
        twin = traceable(network)
        assert not any(type(m).__module__.startswith("escnn.nn.modules") and isinstance(m, enn.EquivariantModule)
                       for m in twin.modules()), name
        assert sum(isinstance(m, TracedR2Conv) for m in twin.modules()) == \
            sum(isinstance(m, enn.R2Conv) for m in network.modules()), name
        # the same parameters (the very tensors) in the same order: an optimizer of the network updates the twin
        assert [id(p) for p in twin.parameters()] == [id(p) for p in network.parameters()], name


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_twin_computes_what_escnn_computes(networks, mode):
    for name, network, outputs in networks:
        twin = traceable(network)
        network.train(mode == "train")
        with torch.no_grad():
            for x, y in zip(outputs(twin), outputs(network)):
                assert x.shape == y.shape and x.dtype == y.dtype, name
                torch.testing.assert_close(x, y, rtol=0, atol=ATOL, msg=lambda m: f"{name} ({mode}): {m}")
        network.train()


def test_twin_gives_escnn_gradients(networks):
    for name, network, outputs in networks:
        network.train()
        twin = traceable(network)
        params = [p for p in network.parameters() if p.requires_grad]

        def grads(net):
            loss = sum((y.float() ** 2).mean() for y in outputs(net))
            return torch.autograd.grad(loss, params, allow_unused=True)

        for (pname, _), x, y in zip(network.named_parameters(), grads(twin), grads(network)):
            assert (x is None) == (y is None), f"{name} {pname}"
            if x is not None:
                assert y.abs().max() > 0 or x.abs().max() == 0
                torch.testing.assert_close(x, y, rtol=0, atol=ATOL, msg=lambda m: f"{name} {pname}: {m}")


def reloaded(state: dict) -> dict:
    """A state dict through torch.save and torch.load, as a checkpoint file holds it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_state_dicts_are_escnns_and_load_both_ways(frames, height_maps):
    torch.manual_seed(5)
    sources = all_cases(frames, height_maps)
    torch.manual_seed(6)
    targets = all_cases(frames, height_maps)
    for (name, source, outputs), (_, target, _) in zip(sources, targets):
        twin = traceable(target)
        escnn_state = source.state_dict()
        assert list(twin.state_dict()) == list(escnn_state), name  # the same keys, in the same order
        # an escnn checkpoint into a twin (which is the target network too: they share their tensors)
        twin.load_state_dict(reloaded(escnn_state))
        with torch.no_grad():
            for x, y in zip(outputs(twin), outputs(source)):
                torch.testing.assert_close(x, y, rtol=0, atol=ATOL, msg=lambda m: f"{name}: {m}")
        # a twin's checkpoint into an escnn network, in eval mode (its cached filters refreshed)
        with torch.no_grad():
            for p in twin.parameters():
                p.add_(0.01)
        source.eval()
        source.load_state_dict(reloaded(twin.state_dict()))
        with torch.no_grad():
            for x, y in zip(outputs(source), outputs(twin)):
                torch.testing.assert_close(x, y, rtol=0, atol=ATOL, msg=lambda m: f"{name}: {m}")
        source.train()


def test_dynamo_traces_every_twin_whole_and_never_recompiles(networks):
    """fullgraph=True fails on any graph break; the aot_eager backend traces the backward too, without inductor's
    C++ builds. Three calls with gradients, the weights changed in place between them: one graph, compiled once."""
    for name, network, outputs in networks:
        torch._dynamo.reset()
        twin = traceable(network)
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(outputs, fullgraph=True, backend=counter)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                results = compiled(twin)
                sum(y.float().sum() for y in results).backward()
                with torch.no_grad():
                    for p in twin.parameters():
                        p.mul_(0.999)
        assert counter.frame_count == 1, name  # one graph, compiled once
        with torch.no_grad():
            for x, y in zip(outputs(network), compiled(twin)):
                torch.testing.assert_close(y, x, rtol=1e-5, atol=ATOL, msg=lambda m: f"{name}: {m}")
        network.zero_grad(set_to_none=True)


def test_through_traced_swaps_the_networks_for_their_twins():
    module = load_script("dqn_equi_bullet")
    torch.manual_seed(0)
    q_network = module.make_q_network(module.Args(n_hidden=8, image_size=32))
    seen = []
    step = through_traced(lambda net, other, scale=None: seen.append((net, other, scale)), q_network)
    step(q_network, 3, scale=q_network)
    assert seen == [(twin_of(q_network), 3, twin_of(q_network))]
    assert twin_of(q_network) is twin_of(q_network)  # one twin per network, shared by every wrapped step
    cnn = module.make_q_network(module.Args(model="cnn", n_hidden=8, image_size=32))
    assert traceable(cnn) is cnn  # nothing to swap in a network without escnn layers


def test_a_layer_without_a_twin_is_named():
    from cleanrl_equi.equivariant import gspaces

    gspace = gspaces.rot2dOnR2(4)
    field = enn.FieldType(gspace, 2 * [gspace.regular_repr])
    with pytest.raises(NotImplementedError, match="ELU"):
        traceable(enn.SequentialModule(enn.ELU(field)))
