"""sac_equi_bullet.py's constrained SAC (cost critic, Lagrange multiplier) and adversarial smoothness: the env's
per-step physics values, exact invariance of the cost critic after real updates, lambda's direction and floor (from
the cost critic or from the measured episode costs), real runs that log the new scalars and resume with lambda, the
adversarial search and its penalty, and the update left bit-identical when both are off.

CPU, tiny networks (C4, n_hidden 8, 32x32 images), as tests/test_sac_equi_bullet.py.
"""

import copy
import os

import gymnasium as gym
import numpy as np
import pytest
import torch

import cleanrl_equi  # noqa: F401  (registers the tasks)
from cleanrl_equi.envs.manipulation import obs_to_tensor
from conftest import (QUARTER_TURN, fails_with, load_script, manipulation_observations, read_scalars, run_script,
                      stop_with_signal)

SCRIPT = "sac_equi_bullet.py"
sac = load_script("sac_equi_bullet")
TINY = ["--group-order", "4", "--n-hidden", "8", "--image-size", "32", "--batch-size", "8", "--learning-starts", "8",
        "--num-envs", "2", "--num-demos", "2", "--max-steps", "6", "--eval-frequency", "100", "--eval-episodes", "2",
        "--num-eval-envs", "2"]


def tiny_args(**kwargs):
    return sac.Args(**{"group_order": 4, "n_hidden": 8, "image_size": 32, "max_steps": 6, **kwargs})


def planner_transitions(task: str = "BlockPulling", steps: int = 12, seed: int = 3):
    """A batch of real planner transitions (32 px) with each step's info, over as many episodes as it takes."""
    env = gym.make(f"cleanrl_equi/{task}-v0", image_size=32, max_steps=6)
    obs, _ = env.reset(seed=seed)
    batch = {key: [] for key in ("obs", "next_obs", "actions", "rewards", "terminated")}
    infos = []
    while len(infos) < steps:
        action = env.unwrapped.expert_action().astype(np.float32)
        next_obs, reward, terminated, truncated, info = env.step(action)
        for key, value in zip(batch, (obs, next_obs, action, reward, terminated)):
            batch[key].append(value)
        infos.append(info)
        obs = env.reset()[0] if terminated or truncated else next_obs
    env.close()
    data = {"obs": obs_to_tensor(np.stack(batch["obs"]), "cpu"),
            "next_obs": obs_to_tensor(np.stack(batch["next_obs"]), "cpu"),
            "actions": torch.as_tensor(np.stack(batch["actions"])),
            "rewards": torch.as_tensor(batch["rewards"], dtype=torch.float32),
            "terminated": torch.as_tensor(batch["terminated"], dtype=torch.float32)}
    return data, {key: np.stack([info[key] for info in infos]) for key in infos[0]}


def test_step_metrics_are_the_env_steps_own_and_make_the_costs():
    """The per-step values the costs read: 0 at reset, within the episode's running values, and the episode's peaks
    are the largest step peaks; the cost is the excess over the threshold in units of the threshold."""
    env = gym.make("cleanrl_equi/BlockPulling-v0", image_size=32)
    _, info = env.reset(seed=2)
    assert all(float(info[key]) == 0.0 for key in ("step_peak_grip_force", "step_peak_impact_force",
                                                  "step_mean_squared_jerk"))
    steps = []
    for _ in range(40):
        _, _, terminated, truncated, info = env.step(env.unwrapped.expert_action())
        steps.append({key: float(value) for key, value in info.items()})
        if terminated or truncated:
            break
    env.close()
    grip = [s["step_peak_grip_force"] for s in steps]
    impact = [s["step_peak_impact_force"] for s in steps]
    jerk = [s["step_mean_squared_jerk"] for s in steps]
    assert max(grip) > 1.0 and max(impact) > 0.5 and max(jerk) > 0  # the planner touches, blocks rest, it moves
    assert max(grip) == steps[-1]["peak_grip_force"] and max(impact) == steps[-1]["peak_impact_force"]
    assert all(s["step_peak_grip_force"] <= s["peak_grip_force"] for s in steps)
    assert min(jerk) <= steps[-1]["mean_squared_jerk"] <= max(jerk)
    infos = {key: np.array([steps[i][key] for i in range(len(steps))]) for key in steps[0]}
    threshold = 0.5 * max(grip)
    costs = sac.step_costs(infos, tiny_args(cost_limit=1.0, cost_threshold=threshold))
    np.testing.assert_allclose(costs, np.maximum(0.0, np.array(grip) - threshold) / threshold, rtol=1e-6)
    assert costs.dtype == np.float32 and costs.max() > 0 and costs.min() == 0.0
    jerk_costs = sac.step_costs(infos, tiny_args(cost_limit=1.0, cost_kind="jerk"))  # default threshold 1e6
    np.testing.assert_allclose(jerk_costs, np.maximum(0.0, np.array(jerk) - 1e6) / 1e6, rtol=1e-6)


def test_budget_in_the_cost_critics_units():
    args = tiny_args(cost_limit=3.0, max_steps=50, gamma=0.99)
    assert sac.discounted_budget(args) == pytest.approx(3.0 / 50 * sum(0.99**k for k in range(50)))


@pytest.mark.parametrize("group_order", [4, 8])
def test_cost_critic_is_invariant_after_updates_on_real_costs(group_order):
    """The cost critic (the reward critic's class, with its own target) after TD steps on real planner transitions
    and their real impact costs: both heads unchanged when the observation and (dx, dy) turn by 90, 180, 270 degrees,
    not when only the image turns."""
    args = tiny_args(group_order=group_order, cost_limit=1.0, cost_kind="impact", cost_threshold=0.1)
    data, infos = planner_transitions()
    data["costs"] = torch.as_tensor(sac.step_costs(infos, args))
    assert data["costs"].min() > 0  # resting blocks weigh more than 0.1 N
    torch.manual_seed(0)
    actor, critic = sac.EquiActor(args), sac.EquiCritic(args)
    cost_critic = sac.EquiCritic(args)
    cost_target = copy.deepcopy(cost_critic).requires_grad_(False)
    log_alpha = torch.zeros(1, requires_grad=True)
    before = copy.deepcopy(cost_critic.state_dict())
    for _ in range(3):
        stats = sac.critic_update_step(actor, critic, copy.deepcopy(critic), torch.optim.Adam(critic.parameters()),
                                       log_alpha, args, data, cost_critic, cost_target,
                                       torch.optim.Adam(cost_critic.parameters(), lr=1e-2))
    assert stats["qc_loss"] > 0 and any(not torch.equal(before[k], v) for k, v in cost_critic.state_dict().items())
    x, actions = data["obs"], torch.rand(len(data["obs"]), 5) * 2 - 1
    with torch.no_grad():
        reference = cost_critic(x, actions)
        assert all(q.abs().max() > 1e-3 for q in reference)
        for k in (1, 2, 3):
            turned = actions.clone()
            turned[:, 1:3] = actions[:, 1:3] @ torch.as_tensor(np.linalg.matrix_power(QUARTER_TURN, k),
                                                               dtype=torch.float32).T
            for head, q in enumerate(cost_critic(torch.rot90(x, k, dims=(-2, -1)), turned)):
                torch.testing.assert_close(q, reference[head], atol=1e-5, rtol=0)
        assert (cost_critic(torch.rot90(x, 1, dims=(-2, -1)), actions)[0] - reference[0]).abs().max() > 1e-4


class FixedCost(torch.nn.Module):
    """A cost critic whose Q_c(s, a) is a set number: synthetic costs for lambda's update."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def q_values(self, features, action):
        q = torch.full((len(action),), self.value) + 0 * action.sum(1)
        return q, q


def lambda_stepper(args, lambda_start: float):
    """A function taking one actor step on real observations against a fixed cost critic and returning lambda after
    it, with the lambda tensor it steps."""
    x = manipulation_observations(image_size=32)
    data = {"obs": x, "next_obs": x, "actions": torch.zeros(len(x), 5)}
    torch.manual_seed(0)
    actor, critic = sac.EquiActor(args), sac.EquiCritic(args)
    with torch.no_grad():
        features = critic.encode(x)
    log_alpha = torch.zeros(1, requires_grad=True)
    lagrange = torch.tensor([lambda_start], requires_grad=True)
    optimizers = (torch.optim.Adam(actor.parameters(), lr=1e-3), torch.optim.Adam([log_alpha], lr=1e-3))
    lagrange_optimizer = torch.optim.Adam([lagrange], lr=args.lambda_lr)

    def step(q_cost, episode_cost=None):
        return sac.actor_update_step(actor, critic, optimizers[0], log_alpha, optimizers[1], args, data, features,
                                     FixedCost(q_cost), features, lagrange, lagrange_optimizer,
                                     episode_cost)["lambda"].item()
    return step, lagrange


def test_lambda_rises_over_the_budget_and_falls_to_zero_under_it():
    args = tiny_args(cost_limit=2.0, lambda_lr=0.05)
    budget = sac.discounted_budget(args)
    step, lagrange = lambda_stepper(args, args.lambda_init)

    def steps(q_cost, n):
        return [step(q_cost) for _ in range(n)]

    rising = steps(budget + 1.0, 8)  # expected cost over the budget: lambda grows at every step
    assert np.all(np.diff([0.0, *rising]) > 0) and rising[-1] > 0.2
    assert lagrange.item() == rising[-1]
    falling = steps(budget - 1.0, 40)  # under it: lambda shrinks (after Adam's momentum turns) to exactly 0
    peak = int(np.argmax(falling))
    assert peak < 5 and np.all(np.diff(falling[peak:]) <= 0) and min(falling) >= 0.0
    assert falling.index(0.0) < 35 and all(v == 0.0 for v in falling[falling.index(0.0):])  # and stays there


def test_lambda_follows_the_measured_episode_costs_under_lambda_update_episodes():
    """With --lambda-update episodes lambda weighs the training episodes' measured cost against --cost-limit itself
    and ignores the cost critic: here Q_c says 0 (under any budget), the episodes say otherwise. Before the first
    episode has ended there is nothing to weigh and lambda stays where it is."""
    args = tiny_args(cost_limit=2.0, lambda_lr=0.05, lambda_update="episodes")
    step, _ = lambda_stepper(args, 0.5)

    def steps(average, seen, n):
        return [step(0.0, torch.tensor([average, seen])) for _ in range(n)]

    assert steps(50.0, 0, 3) == [0.5, 0.5, 0.5]  # no episode yet: no step, whatever the average holds
    rising = steps(3.0, 4, 8)  # episodes over the budget although the critic's Q_c is 0
    assert np.all(np.diff([0.5, *rising]) > 0) and rising[-1] > 0.8
    falling = steps(1.0, 20, 60)  # under it: down to exactly 0 and no further
    assert min(falling) == 0.0 and falling[-1] == 0.0


def test_lambda_update_episodes_run_rises_over_the_budget_and_resumes_its_average(workdir):
    """A real tiny run whose every episode costs far more than its budget (resting blocks press on the table above
    0.1 N): lambda, from 0, rises at every logged step once the first episodes have ended; the logged average is the
    mean of the episode costs so far (fewer episodes than the window), and a run stopped by USR1 resumes with it."""
    flags = [*TINY, "--total-timesteps", "60", "--run-name", "e", "--checkpoint-minutes", "0", "--progress-interval",
             "0", "--log-frequency", "1", "--cost-limit", "1", "--cost-kind", "impact", "--cost-threshold", "0.1",
             "--lambda-lr", "0.05", "--lambda-update", "episodes"]
    stop_with_signal(SCRIPT, *flags, cwd=workdir, at="step 40/")
    saved = torch.load(os.path.join(workdir, "runs", "e", "resume.pt"), weights_only=False)
    average, seen = saved["state"]["episode_cost"].tolist()
    assert seen >= 2 and average > 1 and float(saved["state"]["lagrange"]) > 0.1

    run_script(SCRIPT, *flags, cwd=workdir)
    scalars = read_scalars(os.path.join(workdir, "runs", "e"))
    episode_costs = scalars["charts/episodic_cost"]
    assert len(episode_costs) < 20 and all(v > 1 for _, v in episode_costs)
    step, last_average = scalars["charts/episodic_cost_average"][-1]
    assert last_average == pytest.approx(np.mean([v for s, v in episode_costs if s <= step]), rel=1e-4)
    lambdas = [v for _, v in scalars["charts/lambda"]]
    rising = lambdas[lambdas.index(next(v for v in lambdas if v > 0)):]
    assert np.all(np.diff(rising) > 0) and len(rising) > 10  # across the resume too: it goes on from the saved one


def test_constrained_run_logs_its_scalars_and_resumes_with_lambda(workdir):
    """A real tiny run with the constraint on (every step costs: resting blocks press on the table with more than
    0.1 N, about 50 per step) and adversarial smoothness: the new scalars are logged, and a run stopped by USR1
    resumes with lambda, the cost critics and their optimizers from its resume file. The budget of 100 per episode
    is violated by every episode, but the young cost critic's Q_c stays far below its discounted form (98.5), so
    lambda falls from 1 by about 0.05 a step to exactly 0: where it resumes tells the saved lambda from a fresh one."""
    flags = [*TINY, "--total-timesteps", "60", "--run-name", "c", "--checkpoint-minutes", "0", "--progress-interval",
             "0", "--log-frequency", "1", "--cost-limit", "100", "--cost-kind", "impact", "--cost-threshold", "0.1",
             "--lambda-init", "1", "--lambda-lr", "0.05", "--smooth-adversarial-weight", "0.1",
             "--smooth-adversarial-steps", "2"]
    stop_with_signal(SCRIPT, *flags, cwd=workdir, at="step 30/")
    saved = torch.load(os.path.join(workdir, "runs", "c", "resume.pt"), weights_only=False)
    state = saved["state"]
    for key in ("cost_critic", "cost_critic_target", "cost_critic_optimizer", "lagrange", "lagrange_optimizer"):
        assert key in state, key
    assert state["replay_buffer"]["costs"].max() > 0
    saved_lambda = float(state["lagrange"])
    assert saved_lambda < 0.7  # more than 10 steps of about 0.05 each, down

    run_script(SCRIPT, *flags, cwd=workdir)
    scalars = read_scalars(os.path.join(workdir, "runs", "c"))
    for tag in ("charts/lambda", "charts/episodic_cost", "charts/cost_budget_violation", "losses/qc_loss",
                "losses/qc_values", "losses/qc_pi", "losses/lambda_loss", "losses/smooth_adversarial"):
        assert tag in scalars and all(np.isfinite(v) for _, v in scalars[tag]), tag
    assert all(v > 0 for _, v in scalars["charts/episodic_cost"])
    assert all(v == 1.0 for _, v in scalars["charts/cost_budget_violation"])
    assert scalars["charts/cost_budget_q"][0][1] == pytest.approx(100 / 6 * (1 - 0.99**6) / 0.01)
    lambdas = [v for _, v in scalars["charts/lambda"]]
    assert np.all(np.diff(lambdas) <= 0) and lambdas[-1] == 0.0 and min(lambdas) >= 0  # down to the floor, not below
    after = [v for step, v in scalars["charts/lambda"] if step > saved["global_step"]]
    assert after and 0 < saved_lambda - after[0] < 0.08  # one Adam step down from the saved lambda, not from 1


def test_adversarial_change_beats_a_random_one_and_the_penalty_shrinks_it():
    torch.manual_seed(0)
    args = tiny_args(smooth_adversarial_weight=30.0, smooth_adversarial_radius=0.03, smooth_adversarial_steps=4,
                     policy_lr=3e-3)
    x = manipulation_observations(image_size=32)
    actor, critic = sac.EquiActor(args), sac.EquiCritic(args)
    radius, steps = args.smooth_adversarial_radius, args.smooth_adversarial_steps

    def adversarial():
        torch.manual_seed(1)
        return sac.adversarial_smoothness(actor, x, radius, steps, 2.5 * radius / steps).item()

    def random_change():
        with torch.no_grad():
            action = torch.tanh(actor(x)[0])
            deltas = [(torch.rand_like(x[:, :1]) * 2 - 1) * radius for _ in range(5)]
            changes = [(action - torch.tanh(actor(sac.with_heights(x, delta))[0])).pow(2).sum(1).mean().item()
                       for delta in deltas]
        return max(changes)

    before = adversarial()
    assert before > 1.5 * random_change() > 0
    data = {"obs": x, "next_obs": x, "actions": torch.zeros(len(x), 5)}
    with torch.no_grad():
        features = critic.encode(x)
    log_alpha = torch.zeros(1, requires_grad=True)
    optimizers = (torch.optim.Adam(actor.parameters(), lr=args.policy_lr), torch.optim.Adam([log_alpha], lr=1e-3))
    for _ in range(30):
        stats = sac.actor_update_step(actor, critic, optimizers[0], log_alpha, optimizers[1], args, data, features)
    assert stats["smooth_adversarial"] > 0
    assert adversarial() < 0.5 * before


def test_off_by_default_and_a_zero_lambda_leave_the_update_bit_identical():
    """Both options are off by default, and the constrained path's extra work (a cost critic fitted in the same step
    from the same next actions, lambda Q_c in the actor loss) changes nothing on the reward side while lambda is 0:
    the same seeds give the same statistics and weights, to the bit."""
    defaults = sac.Args()
    assert defaults.cost_limit is None and defaults.smooth_adversarial_weight == 0
    args = tiny_args(demo_loss_weight=1.0, caps_spatial_weight=0.1, cost_limit=1.0)  # the steps read it for lambda
    data, infos = planner_transitions()
    data["expert"] = torch.arange(len(data["obs"])) % 2 == 0
    data["costs"] = torch.as_tensor(sac.step_costs(infos, tiny_args(cost_limit=1.0, cost_threshold=0.1)))
    torch.manual_seed(0)
    base = {"actor": sac.EquiActor(args), "critic": sac.EquiCritic(args), "cost_critic": sac.EquiCritic(args)}

    def one_update(constrained: bool):
        nets = copy.deepcopy(base)
        actor, critic, cost_critic = nets["actor"], nets["critic"], nets["cost_critic"]
        log_alpha = torch.tensor([np.log(args.alpha)], requires_grad=True)
        lagrange = torch.zeros(1, requires_grad=True)
        cost = (cost_critic, copy.deepcopy(cost_critic), torch.optim.Adam(cost_critic.parameters())) if constrained \
            else ()
        torch.manual_seed(7)
        critic_stats = sac.critic_update_step(actor, critic, copy.deepcopy(critic),
                                              torch.optim.Adam(critic.parameters()), log_alpha, args, data, *cost)
        extra = (cost_critic, critic_stats["cost_features"], lagrange, torch.optim.Adam([lagrange])) if constrained \
            else ()
        actor_stats = sac.actor_update_step(actor, critic, torch.optim.Adam(actor.parameters()), log_alpha,
                                            torch.optim.Adam([log_alpha]), args, data, critic_stats["features"],
                                            *extra)
        return critic_stats, actor_stats, actor.state_dict(), critic.state_dict()

    plain, constrained = one_update(False), one_update(True)
    for key, value in plain[0].items():
        assert torch.equal(value, constrained[0][key]), key
    for key in ("actor_loss", "demo_loss", "caps_temporal", "caps_spatial", "alpha_loss", "alpha"):
        assert torch.equal(plain[1][key], constrained[1][key]), key
    for weights_plain, weights_constrained in zip(plain[2:], constrained[2:]):
        for key, value in weights_plain.items():
            assert torch.equal(value, weights_constrained[key]), key
    assert plain[1]["lambda"] == 0 and plain[1]["smooth_adversarial"] == 0


@pytest.mark.parametrize("args, words", [
    (dict(cost_limit=-1.0), "--cost-limit"), (dict(cost_limit=1.0, cost_threshold=0.0), "--cost-threshold"),
    (dict(lambda_init=-0.5), "--lambda-init"), (dict(lambda_lr=0.0), "--lambda-lr"),
    (dict(cost_limit=1.0, lambda_cost_window=0), "--lambda-cost-window"),
    (dict(lambda_update="episodes"), "--cost-limit"),
    (dict(smooth_adversarial_steps=0), "--smooth-adversarial-steps"),
    (dict(smooth_adversarial_radius=0.0), "--smooth-adversarial-radius"),
])
def test_bad_settings_stop_with_one_sentence(args, words, capsys):
    fails_with(capsys, [words], sac.check_args, tiny_args(**args))
