"""The manipulation env settings, defined once: every manipulation script's `Args` (and the dataset tool's) derives
from `ManipulationEnvArgs`, so an env option is one field here with its docstring and its range check, and every
script gets it as a flag of the same name (`--workspace-size`, `--dpos`, ...).

The defaults are the setting of "SO(2)-Equivariant Reinforcement Learning" (Wang, Walters, Platt, ICLR 2022): a
0.4 m workspace seen as 128 px over 0.6 m, steps of 0.05 m and pi/8, 100-step episodes, the paper's task sizes.
`BulletArmEnvArgs` holds BulletArm's later env defaults (0.3 m, pi/4, 50 steps, BulletArm's task sizes), which the
offline datasets are collected with. A script whose algorithm has its own paper setting (the DQN's finer steps)
re-declares just those fields, with a docstring that says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from cleanrl_equi.errors import fail, require_range

TaskId = Literal["cleanrl_equi/BlockPulling-v0", "cleanrl_equi/BlockPushing-v0", "cleanrl_equi/BlockPicking-v0",
                 "cleanrl_equi/DrawerOpening-v0", "cleanrl_equi/BlockInBowl-v0", "cleanrl_equi/BlockStacking-v0",
                 "cleanrl_equi/HouseBuilding-v0", "cleanrl_equi/CornerPicking-v0"]
"""The eight tasks (`cleanrl_equi.MANIPULATION_TASKS`); as a Literal, tyro lists them in --help and names them when
an unknown id is given."""

IMAGE_SIZES = (16, 32, 64, 128, 256, 512, 1024)


@dataclass
class ManipulationEnvArgs:
    """Which task, how it is seen, how the gripper moves, and the physics priors of the env (the paper's setting)."""

    env_id: TaskId = "cleanrl_equi/BlockPulling-v0"
    """the id of a manipulation task, `cleanrl_equi/<Task>-v0`"""
    image_size: int = 128
    """observation height and width in pixels: 16, 32, 64, 128 (paper) or 256; the image spans 1.5 x the workspace"""
    workspace_size: float = 0.4
    """side of the square workspace in metres (the paper's 0.4, seen as 0.6 m; BulletArm's default 0.3)"""
    dpos: float = 0.05
    """metres the gripper moves per unit of dx, dy, dz (the paper's SAC: 0.05)"""
    drot_n: int = 8
    """one unit of dtheta turns the gripper by pi / drot_n radians (the paper's SAC: 8; BulletArm's default 4)"""
    max_steps: int = 100
    """episode length limit (the paper's 100; BulletArm's 50)"""
    paper_tasks: bool = True
    """the paper's task sizes and success thresholds where BulletArm's differ: Block Pulling blocks 10 x 10 x 5 cm
    of 0.5 kg, Block Picking and Corner Picking lifted above 0.08 m, a 5 cm cube in Corner Picking"""
    robot: Literal["floating", "kuka", "panda"] = "floating"
    """what carries the gripper: a floating gripper, or the paper's Kuka iiwa or a Franka Panda arm beside the
    workspace, moved by inverse kinematics to the same targets (docs/manipulation_tasks.md, "Robot arms")"""

    # Smooth, gentle motion in the env: reward shaping and compliance (shaping off by default)
    action_rate_penalty: float = 0.0
    """env reward shaping: minus this times |a_t - a_t-1|^2 (normalised actions) at every step (0 = off)"""
    force_penalty: float = 0.0
    """env reward shaping: minus this times (peak gripper contact force in a step - threshold) / threshold (0 = off)"""
    force_threshold: float = 20.0
    """newtons of gripper contact force the force penalty tolerates"""
    gripper_force: float = 150.0
    """compliance: the most force (N) the gripper's positioning constraint applies; lower yields on contact"""
    finger_force: float = 25.0
    """compliance: the most force (N) each finger squeezes with"""
    action_filter_tau: float = 0.0
    """action-space prior: time constant (s) of a first-order filter between the commanded and the executed gripper
    move (dx, dy, dz, dtheta; not the fingers): each 0.18 s move steps 1 - exp(-0.18 / tau) of the way from the last
    executed move to the command, so the change of velocity between moves is bounded (bounded jerk) and a turned
    command gives the turned move. Chosen over a rate limit because it is linear (no clipping: equivariant under
    any rotation) and still reaches any command (0 = off)"""

    def check_env_settings(self) -> None:
        """Stop at start-up, with one sentence, on env settings that cannot work."""
        from cleanrl_equi.envs.manipulation.rollouts import check_env_id

        check_env_id(self.env_id)
        if self.image_size not in IMAGE_SIZES:
            fail(f"--image-size must be a power of two from 16 to 1024 (the networks halve it down to 8 x 8 pixels), "
                 f"not {self.image_size}.")
        require_range(self, "workspace_size", 0.25, 0.6, "metres", "the tasks' objects need room")
        require_range(self, "dpos", 0.005, 0.1, "metres per step")
        if not 2 <= self.drot_n <= 314:
            fail(f"--drot-n must be from 2 to 314 (a dtheta step of pi / drot_n radians), not {self.drot_n}.")
        if self.max_steps < 1:
            fail(f"--max-steps must be at least 1, not {self.max_steps}.")
        require_range(self, "action_rate_penalty", 0.0, 1e6)
        require_range(self, "force_penalty", 0.0, 1e6)
        require_range(self, "force_threshold", 0.1, 1000, "N")
        require_range(self, "gripper_force", 1, 1000, "N")
        require_range(self, "finger_force", 1, 200, "N")
        require_range(self, "action_filter_tau", 0.0, 2.0, "seconds", "0 = off; 2 s already takes 11 moves to reach "
                      "63% of a command")

    def env_settings(self) -> dict:
        """These settings, by field name, as they are recorded (in datasets) and compared."""
        return {f.name: getattr(self, f.name) for f in fields(ManipulationEnvArgs)}

    def env_kwargs(self, physics_metrics: bool = True) -> dict:
        """The kwargs of `gym.make(env_id, ...)` for these settings. `physics_metrics=False` skips sampling the
        smoothness and gentleness metrics (envs whose info nobody reads; a force penalty samples them anyway)."""
        kwargs = {name: value for name, value in self.env_settings().items()
                  if name not in ("env_id", "drot_n", "paper_tasks")}
        kwargs.update(drot=math.pi / self.drot_n, physics_metrics=physics_metrics)
        if self.paper_tasks:
            from cleanrl_equi.envs.manipulation.tasks import PAPER_TASK_KWARGS  # imports pybullet, as gym.make does

            kwargs.update(PAPER_TASK_KWARGS.get(self.env_id.removeprefix("cleanrl_equi/").removesuffix("-v0"), {}))
        return kwargs


@dataclass
class BulletArmEnvArgs(ManipulationEnvArgs):
    """BulletArm's env defaults, which the offline datasets are collected with (the Equi-CQL/IQL paper's setting)."""

    workspace_size: float = 0.3
    """side of the square workspace in metres (BulletArm's default 0.3; the ICLR-2022 paper's 0.4)"""
    drot_n: int = 4
    """one unit of dtheta turns the gripper by pi / drot_n radians (BulletArm's default 4)"""
    max_steps: int = 50
    """episode length limit (BulletArm's 50)"""
    paper_tasks: bool = False
    """the ICLR-2022 paper's task sizes and success thresholds instead of BulletArm's (see `--help` of
    sac_equi_bullet.py)"""
