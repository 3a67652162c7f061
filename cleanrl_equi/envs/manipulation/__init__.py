"""The manipulation task suite (pybullet close-loop tasks after BulletArm) and what the manipulation scripts do with
it: the shared env settings, vector envs, the observation tensor, rotation of batches, evaluation.

`settings` holds the env settings every manipulation script's Args derives from, `scene` the physics and rendering
base, `tasks` the eight tasks with their planners, `rollouts` the agent-side helpers. Importing this package does
not import pybullet; `gym.make("cleanrl_equi/<Task>-v0")` does.
"""

from cleanrl_equi.envs.manipulation.rollouts import (action_smoothness, check_env_id, evaluate, evaluate_checkpoint,
                                                     format_eval, make_envs, obs_to_tensor, rotate_batch)
from cleanrl_equi.envs.manipulation.settings import BulletArmEnvArgs, ManipulationEnvArgs, TaskId

__all__ = ["BulletArmEnvArgs", "ManipulationEnvArgs", "TaskId", "action_smoothness", "check_env_id", "evaluate",
           "evaluate_checkpoint", "format_eval", "make_envs", "obs_to_tensor", "rotate_batch"]
