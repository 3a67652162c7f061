"""The networks of the manipulation scripts: exact symmetry on real observations, deliberate copies that stay equal
across scripts, escnn's train/eval rules kept by the module base, and the fast weight initialisation."""

import numpy as np
import pytest
import torch

from cleanrl_equi.equivariant import EscnnModule, _escnn_he_init_variances, enn, gspaces, he_init_variances
from conftest import QUARTER_TURN, assert_equivariant, load_script, manipulation_observations

SCRIPTS = ("sac_equi_bullet", "cql_equi_offline", "iql_equi_offline")
SHARED = ("EquiActor", "EquiCritic", "CNNActor", "CNNCritic")  # the same networks, copied on purpose


def tiny(script, **kwargs):
    return load_script(script).Args(**{"group_order": 4, "n_hidden": 8, "image_size": 32, **kwargs})


def turn_image(k):
    return lambda x: torch.rot90(x, k, dims=(-2, -1))


def turn_action(k):
    """(p, dx, dy, dz, dtheta): (dx, dy) turns with the world, the rest is invariant."""
    rotation = torch.as_tensor(np.linalg.matrix_power(QUARTER_TURN, k), dtype=torch.float32)

    def act(a):
        a = a.clone()
        a[:, 1:3] = a[:, 1:3] @ rotation.T
        return a

    return act


@pytest.fixture(scope="module")
def observations():
    x = manipulation_observations()
    assert x[:, 1].max() == 1.0 and x[:, 1].min() == 0.0  # holding and not holding both appear
    return x


@pytest.mark.parametrize("group_order", [4, 8])
@pytest.mark.parametrize("script", SCRIPTS)
def test_actor_equivariant_critic_and_value_invariant_on_real_observations(script, group_order, observations):
    """Actor: the (dx, dy) mean turns with the image, every other output is unchanged; twin Q (given the turned
    action) and IQL's V: unchanged. The three 90-degree turns act exactly on the pixel grid."""
    module, args = load_script(script), tiny(script, group_order=group_order)
    torch.manual_seed(0)
    actor, critic = module.EquiActor(args), module.EquiCritic(args)
    x, actions = observations, torch.rand(len(observations), 5) * 2 - 1
    turns = [(turn_image(k), turn_action(k)) for k in (1, 2, 3)]

    def mean_and_log_std(obs):
        mean, log_std = actor(obs)
        return torch.cat([mean, log_std], 1)

    def actor_out(k):
        return lambda y: torch.cat([turn_action(k)(y[:, :5]), y[:, 5:]], 1)

    assert mean_and_log_std(x)[:, 1:3].abs().max() > 1e-3  # not trivially zero
    assert_equivariant(mean_and_log_std, x, [(turn_image(k), actor_out(k)) for k in (1, 2, 3)])
    for head in (0, 1):
        def q(obs_and_action, head=head):
            obs, action = obs_and_action
            return critic(obs, action)[head]

        with torch.no_grad():
            reference = q((x, actions))
            assert reference.abs().max() > 1e-3
            for image_turn, action_turn in turns:
                torch.testing.assert_close(q((image_turn(x), action_turn(actions))), reference, atol=1e-5, rtol=0)
            # turning the image without the action is another state-action pair: Q must be free to change
            assert (q((turn_image(1)(x), actions)) - reference).abs().max() > 1e-4
    if script == "iql_equi_offline":
        value = module.EquiValue(args)
        assert_equivariant(value, x, [(turn_image(k), lambda v: v) for k in (1, 2, 3)])


@pytest.mark.parametrize("model", ["equi", "cnn"])
def test_copies_of_a_network_are_equal_across_scripts(model, observations):
    """Each manipulation script holds its own copy of the networks it trains; built from one seed, the copies must
    have the same parameters and give the same outputs, so an edit to one copy cannot drift unnoticed."""
    actions = torch.rand(len(observations), 5) * 2 - 1
    names = [name for name in SHARED if name.startswith(model.upper() if model == "cnn" else "Equi")]
    for name in names:
        outputs = {}
        for script in SCRIPTS:
            torch.manual_seed(0)
            net = getattr(load_script(script), name)(tiny(script))
            with torch.no_grad():
                out = net(observations) if "Actor" in name else net(observations, actions)
            params = {k: v.detach() for k, v in net.named_parameters()}
            outputs[script] = (params, torch.cat([o.flatten() for o in out]))
        reference_params, reference_out = outputs[SCRIPTS[0]]
        for script in SCRIPTS[1:]:
            params, out = outputs[script]
            assert params.keys() == reference_params.keys(), (name, script)
            for key in params:
                torch.testing.assert_close(params[key], reference_params[key], atol=0, rtol=0)
            torch.testing.assert_close(out, reference_out, atol=0, rtol=0)


def test_escnn_module_base_keeps_the_train_eval_rules(observations):
    sac = load_script("sac_equi_bullet")
    torch.manual_seed(0)
    actor = sac.EquiActor(tiny("sac_equi_bullet"))
    train_keys = set(actor.state_dict())
    assert not any(k.endswith((".filter", ".expanded_bias")) for k in train_keys)
    actor.eval()  # the filters are expanded and cached as buffers ...
    assert any(k.endswith(".filter") for k in torch.nn.Module.state_dict(actor))
    assert set(actor.state_dict()) == train_keys  # ... but a checkpoint holds parameters only, in either mode
    with pytest.raises(RuntimeError, match="eval mode"):  # cached filters would not follow a weight update
        actor(observations)
    with torch.no_grad():
        before = actor(observations)[0]
    other = sac.EquiActor(tiny("sac_equi_bullet"))  # other weights, loaded in eval mode: the cache must follow
    other.eval()
    other.load_state_dict(actor.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(observations)[0], before, atol=0, rtol=0)
    actor.train()
    mean, _ = actor(observations)
    mean.sum().backward()  # train mode: gradients reach the basis coefficients
    assert all(p.grad is not None for p in actor.parameters())
    assert isinstance(actor, EscnnModule)


@pytest.mark.parametrize("group", ["C8", "C4", "flip"])
def test_fast_he_initialisation_equals_escnns(group):
    gspace = {"C8": gspaces.rot2dOnR2(8), "C4": gspaces.rot2dOnR2(4), "flip": gspaces.flip2dOnR2()}[group]

    def regular(n):
        return enn.FieldType(gspace, n * [gspace.regular_repr])

    vector_and_invariants = enn.FieldType(gspace, [gspace.basespace_action] + 3 * [gspace.trivial_repr])
    layers = [(enn.FieldType(gspace, 2 * [gspace.trivial_repr]), regular(4), 3), (regular(8), regular(16), 3),
              (regular(8) + vector_and_invariants, regular(8), 1), (regular(8), vector_and_invariants, 1),
              (regular(4), enn.FieldType(gspace, 3 * [gspace.trivial_repr] + 2 * [gspace.regular_repr]), 1)]
    for in_type, out_type, size in layers:
        conv = enn.R2Conv(in_type, out_type, size, initialize=False)
        assert torch.equal(he_init_variances(conv.basisexpansion), _escnn_he_init_variances(conv.basisexpansion))
