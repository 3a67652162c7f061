"""Replay buffers of the online manipulation scripts (`sac_equi_bullet.py`, `dqn_equi_bullet.py`), defined once the
way CleanRL's scripts import theirs: a uint8 ring buffer of `num_envs` parallel streams that stores each
observation once, keeps its demonstrations when asked, and saves its state into a resume file; and prioritised
replay as a subclass (SACfD's buffer). Rotated copies of sampled batches (the paper's buffer augmentation) are the
symmetry, so they stay in the scripts.
"""

from __future__ import annotations

import numpy as np
import torch

from cleanrl_equi.datasets import stored_obs_to_tensor


class ReplayBuffer:
    """Transitions of `num_envs` parallel streams, each observation stored once.

    Row i holds, for every env, the observation s_i (height channel as uint8, holding flag as one bool) and the
    transition (a_i, r_i, terminated_i) that left it; s_{i+1} is the next row's observation. The step in which a
    vector env resets an env after an episode end (gymnasium's next-step autoreset) is stored as an invalid row,
    so no transition ever joins two episodes. 100k transitions of 128x128 images take 1.6 GB (16 KiB each).
    Rows 0 .. keep - 1 are never overwritten (`protect`): a full buffer wraps to row `keep`, not to row 0.

    Actions are stored as `action_shape` of `action_dtype`: SAC's continuous (p, dx, dy, dz, dtheta), float32, (5,);
    DQN's index into its discrete action set, int16, () (sampled as int64, ready for `gather`). `expert` marks the
    transitions of demonstrations. With `costs=True` each transition also keeps a float cost next to its reward
    (constrained SAC's), and batches carry it as `costs`.
    """

    scalars = ("pos", "filled", "keep")  # the state besides the arrays

    def __init__(self, capacity: int, num_envs: int, image_size: int, action_shape: tuple[int, ...] = (5,),
                 action_dtype: type = np.float32, costs: bool = False):
        self.rows, self.num_envs, self.pos, self.filled, self.keep = capacity // num_envs, num_envs, 0, 1, 0
        self.heights = np.zeros((self.rows, num_envs, image_size, image_size), dtype=np.uint8)
        self.holding = np.zeros((self.rows, num_envs), dtype=bool)
        self.actions = np.zeros((self.rows, num_envs, *action_shape), dtype=action_dtype)
        self.rewards = np.zeros((self.rows, num_envs), dtype=np.float32)
        self.terminated = np.zeros((self.rows, num_envs), dtype=bool)
        self.expert = np.zeros((self.rows, num_envs), dtype=bool)
        self.valid = np.zeros((self.rows, num_envs), dtype=bool)
        if costs:
            self.costs = np.zeros((self.rows, num_envs), dtype=np.float32)

    def _put_observation(self, obs: np.ndarray):
        self.heights[self.pos], self.holding[self.pos] = obs[:, 0], obs[:, 1, 0, 0] > 0
        self.valid[self.pos] = False  # the old transition of this row just lost its observation

    def start(self, obs: np.ndarray):
        """The first observations after a reset of all envs (an invalid row closes any unfinished stream)."""
        if self.valid.any() or self.pos > 0:
            none = np.zeros(self.num_envs, bool)
            self.add(np.zeros_like(self.actions[0]), np.zeros(self.num_envs), none, none, obs)
        else:
            self._put_observation(obs)

    def add(self, actions, rewards, terminated, valid, next_obs, expert=False, costs=0.0) -> int:
        """Store one vector step (`valid`: which envs' transitions are real; `expert`: which are demonstrations;
        `costs`: kept only by a buffer made with `costs=True`); returns its row, so a caller can drop its transitions
        again (`valid[row, env] = False`)."""
        p = self.pos
        self.actions[p], self.rewards[p], self.terminated[p] = actions, rewards, terminated
        if hasattr(self, "costs"):
            self.costs[p] = costs
        self.valid[p], self.expert[p] = valid, expert
        self.pos = p + 1 if p + 1 < self.rows else self.keep
        self.filled = max(self.filled, self.pos + 1)  # rows 0 .. filled - 1 hold data (all of them once it wraps)
        self._put_observation(next_obs)
        return p

    def protect(self) -> None:
        """Keep every row written so far (the demonstrations) for good. Call it right after `start`, whose invalid
        row ends the kept rows, so no kept transition leads into the first row the ring overwrites."""
        if self.pos + 1 != self.filled or self.pos > self.rows - 2:
            raise ValueError("the rows to keep fill the replay buffer")
        if self.pos > 0 and self.valid[self.pos - 1].any():
            raise ValueError("protect() must follow start(): the last kept row leads into the row the ring overwrites")
        self.keep = self.pos

    def _next_rows(self, rows: np.ndarray) -> np.ndarray:
        return np.where(rows + 1 < self.rows, rows + 1, self.keep)

    def __len__(self) -> int:
        return int(self.valid.sum())

    def state_dict(self) -> dict:
        """The filled rows only, as tensors sharing the buffer's memory (torch writes them as raw bytes, without a
        copy): a resume file early in a run is small, and a full 100k-transition 128 px buffer is 1.6 GB."""
        arrays = {k: torch.from_numpy(v[: self.filled]) for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        return {**{k: getattr(self, k) for k in self.scalars}, **arrays}

    def load_state_dict(self, state: dict) -> None:
        state = {"keep": 0, "expert": torch.zeros_like(torch.as_tensor(state["valid"])), **state}  # DQN's older files
        for key, array in vars(self).items():
            if isinstance(array, np.ndarray):
                if state[key].shape[1:] != array.shape[1:] or len(state[key]) > len(array):
                    raise ValueError(f"replay buffer {key} has shape {state[key].shape}, not {array.shape}")
                array[: len(state[key])] = np.asarray(state[key])
                array[len(state[key]):] = 0
        for key in self.scalars:
            setattr(self, key, state[key])

    def sample(self, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        return self._batch(np.random.choice(np.flatnonzero(self.valid.ravel()), batch_size), device)

    def _batch(self, flat: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        """The transitions at flat indices row * num_envs + env."""
        rows, envs = np.divmod(flat, self.num_envs)
        next_rows = self._next_rows(rows)

        as_tensor = lambda a: torch.as_tensor(a[rows, envs], device=device)  # noqa: E731
        actions = as_tensor(self.actions)
        batch = {"obs": stored_obs_to_tensor(self.heights[rows, envs], self.holding[rows, envs], device),
                 "next_obs": stored_obs_to_tensor(self.heights[next_rows, envs], self.holding[next_rows, envs], device),
                 "actions": actions if actions.is_floating_point() else actions.long(),
                 "rewards": as_tensor(self.rewards), "terminated": as_tensor(self.terminated).float(),
                 "expert": as_tensor(self.expert)}
        if hasattr(self, "costs"):
            batch["costs"] = as_tensor(self.costs)
        return batch


class PrioritizedReplayBuffer(ReplayBuffer):
    """Proportional prioritised replay (Schaul et al. 2016, arXiv 1511.05952) as the paper's SACfD used it.

    Transition i is drawn with probability P(i) = p_i^alpha / sum_j p_j^alpha, one draw from each of `batch_size`
    equal slices of the total (stratified, as the paper's buffer). p_i = |TD error| + eps + `expert_bonus` for a
    demonstration, so the few demonstrations stay in the batches; a new transition enters with the largest p so
    far, so it is seen soon. Each sample comes with its importance-sampling weight (N P(i))^-beta divided by the
    largest such weight in the buffer (that of the smallest priority), so weights lie in (0, 1].

    `priorities` holds p^alpha per stored transition and 0 where there is none (invalid rows), so it is part of the
    saved state like every other array. Sampling is a cumulative sum over the filled rows and a binary search per
    draw: O(N) per batch, like the uniform buffer's scan of its valid flags.
    """

    scalars = (*ReplayBuffer.scalars, "max_priority")

    def __init__(self, capacity: int, num_envs: int, image_size: int, alpha: float = 0.6, eps: float = 1e-6,
                 expert_bonus: float = 1.0, action_shape: tuple[int, ...] = (5,), action_dtype: type = np.float32,
                 costs: bool = False):
        super().__init__(capacity, num_envs, image_size, action_shape, action_dtype, costs)
        self.alpha, self.eps, self.expert_bonus = alpha, eps, expert_bonus
        self.priorities = np.zeros((self.rows, num_envs))
        self.max_priority = 1.0

    def _put_observation(self, obs: np.ndarray):
        super()._put_observation(obs)
        self.priorities[self.pos] = 0.0

    def add(self, actions, rewards, terminated, valid, next_obs, expert=False, costs=0.0) -> int:
        row = super().add(actions, rewards, terminated, valid, next_obs, expert, costs)
        self.priorities[row] = np.where(valid, self.max_priority**self.alpha, 0.0)
        return row

    def sample(self, batch_size: int, device: torch.device, beta: float = 1.0) -> dict:
        """A batch as `ReplayBuffer.sample` gives it, plus `weights` (the importance-sampling weights, on `device`)
        and `indices` (NumPy flat indices, for `update_priorities`)."""
        mass = self.priorities[: self.filled].ravel()
        cumulative = np.cumsum(mass)
        total = cumulative[-1]
        targets = (np.arange(batch_size) + np.random.random_sample(batch_size)) * (total / batch_size)
        flat = np.searchsorted(cumulative, np.minimum(targets, np.nextafter(total, 0.0)), side="right")
        smallest = np.min(mass, where=mass > 0, initial=np.inf)
        batch = self._batch(flat, device)
        batch["weights"] = torch.as_tensor((mass[flat] / smallest) ** -beta, dtype=torch.float32, device=device)
        batch["indices"] = flat
        return batch

    def update_priorities(self, flat: np.ndarray, td_errors: np.ndarray) -> None:
        rows, envs = np.divmod(flat, self.num_envs)
        priority = np.abs(td_errors) + self.eps + self.expert_bonus * self.expert[rows, envs]
        self.max_priority = max(self.max_priority, float(priority.max()))
        self.priorities[rows, envs] = np.where(self.valid[rows, envs], priority**self.alpha, 0.0)


def annealed_beta(start: float, step: int, total_steps: int) -> float:
    """The importance-sampling exponent at gradient step `step` (from 1) of `total_steps`: linear from `start`, 1
    at the last step and after, as the paper anneals it over its training steps."""
    return start + (1.0 - start) * min(1.0, step / max(total_steps, 1))
