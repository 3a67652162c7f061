"""The CAPS smooth-motion prior in cql_equi_offline.py and iql_equi_offline.py: short training runs that log its
terms, each script's copy of caps_terms against sac_equi_bullet.py's (so the copies cannot drift apart), and bad
settings that stop at start-up with one sentence."""

import inspect
import math
import os

import pytest
import torch

import cleanrl_equi  # noqa: F401  (registers the tasks)
from cleanrl_equi.datasets import collect_expert, save_dataset
from conftest import fails_with, load_script, read_scalars, run_script

TINY = ["--group-order", "4", "--n-hidden", "8", "--image-size", "32", "--max-steps", "6", "--batch-size", "4",
        "--eval-episodes", "1", "--num-eval-envs", "1", "--log-frequency", "1", "--eval-frequency", "1000"]
OFFLINE = ["cql_equi_offline", "iql_equi_offline"]
CAPS_TAGS = ["losses/caps_temporal", "losses/caps_spatial"]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """Two planner episodes of Block Pulling at 32 px (a real, if small, offline dataset)."""
    path = str(tmp_path_factory.mktemp("data") / "block_pulling_expert.npz")
    save_dataset(path, collect_expert("cleanrl_equi/BlockPulling-v0", 2, seed=0, image_size=32, max_steps=6))
    return path


@pytest.mark.parametrize("script", OFFLINE)
def test_short_run_logs_the_caps_terms_and_adds_them_to_the_actor_loss(script, tiny_dataset, workdir):
    """With both weights at 0.1, both terms are logged every step, finite, and above zero at some step (a fresh
    actor is not constant), and the first step's actor loss is the default run's plus 0.1 x (the two terms) (same
    seed, same batch, same networks until the first update); with the defaults (off) the same tags are logged as
    zeros, as sac_equi_bullet.py does."""
    flags = [*TINY, "--dataset", tiny_dataset, "--total-timesteps", "4"]
    run_script(f"{script}.py", *flags, "--run-name", "default", cwd=workdir)
    run_script(f"{script}.py", *flags, "--caps-temporal-weight", "0.1", "--caps-spatial-weight", "0.1",
               "--run-name", "caps", cwd=workdir)
    default = read_scalars(os.path.join(workdir, "runs", "default"))
    caps = read_scalars(os.path.join(workdir, "runs", "caps"))
    for tag in CAPS_TAGS:
        for logged in (default, caps):
            assert tag in logged, f"{tag} missing from {sorted(logged)}"
            assert [step for step, _ in logged[tag]] == [1, 2, 3, 4]
        values = [value for _, value in caps[tag]]
        assert all(math.isfinite(value) for value in values) and any(value > 0 for value in values), (tag, values)
        assert all(value == 0 for _, value in default[tag]), default[tag]
    assert all(math.isfinite(value) for _, value in caps["losses/actor_loss"])
    added = caps["losses/actor_loss"][0][1] - default["losses/actor_loss"][0][1]
    terms = 0.1 * (caps["losses/caps_temporal"][0][1] + caps["losses/caps_spatial"][0][1])
    assert terms > 1e-5 and added == pytest.approx(terms, rel=0.02)  # float32 scalars: ~1e-6 of rounding in `added`


@pytest.mark.parametrize("script", OFFLINE)
@pytest.mark.parametrize("model", ["equi", "cnn"])
def test_caps_terms_equal_sacs(script, model):
    """Each offline script keeps its own copy of caps_terms (CleanRL style); it must read and compute exactly as
    sac_equi_bullet.py's: same source, and, for the same actor, states and seed, the same terms and gradients."""
    sac, offline = load_script("sac_equi_bullet"), load_script(script)
    assert inspect.getsource(offline.caps_terms) == inspect.getsource(sac.caps_terms)
    torch.manual_seed(0)
    settings = sac.Args(model=model, group_order=4, n_hidden=8, image_size=32)
    actor = sac.EquiActor(settings) if model == "equi" else sac.CNNActor(settings)
    obs, next_obs = torch.rand(3, 2, 32, 32), torch.rand(3, 2, 32, 32)
    obs[:, 1], next_obs[:, 1] = 1.0, 0.0  # the holding flag, tiled
    for with_mean in (False, True):
        results = []
        for caps_terms in (sac.caps_terms, offline.caps_terms):
            actor.zero_grad()
            mean = actor(obs)[0] if with_mean else None
            torch.manual_seed(7)
            temporal, spatial = caps_terms(actor, obs, next_obs, 0.01, mean)
            (temporal + 2 * spatial).backward()
            results.append((temporal.detach(), spatial.detach(), [p.grad.clone() for p in actor.parameters()]))
        (t_sac, s_sac, g_sac), (t_off, s_off, g_off) = results
        assert torch.equal(t_sac, t_off) and torch.equal(s_sac, s_off)
        assert t_sac > 0 and s_sac > 0
        assert all(torch.equal(a, b) for a, b in zip(g_sac, g_off))


@pytest.mark.parametrize("script", OFFLINE)
@pytest.mark.parametrize("flags,words", [
    ({"caps_temporal_weight": -0.1}, "--caps-temporal-weight must not be negative"),
    ({"caps_spatial_weight": -1.0}, "--caps-spatial-weight must not be negative"),
    ({"caps_sigma": 0.0}, "--caps-sigma must be positive"),
])
def test_bad_caps_settings_stop_with_one_sentence(script, flags, words, capsys):
    module = load_script(script)
    fails_with(capsys, [words], module.check_args, module.Args(**flags))
