"""cleanrl-equi: small shared building blocks for the single-file scripts at the repository root.

Importing the package silences escnn's warning about the optional `py3nj` package (used by escnn only for
3-D groups; every group here is 2-D) and registers the manipulation tasks with gymnasium.
"""

import warnings

import gymnasium as _gym
from gymnasium.envs.registration import WrapperSpec as _WrapperSpec

warnings.filterwarnings("ignore", message=".*py3nj", category=UserWarning)

# The eight manipulation tasks (cleanrl_equi/envs/manipulation/tasks.py). Entry points are strings, so pybullet is only
# imported when one of them is made. Episode limits are the envs' own `max_steps` kwarg (default 50), not a TimeLimit
# wrapper: no max_episode_steps is registered, since gym.make would then add a TimeLimit firing at the env's own
# step. `gym.make(id, max_episode_steps=N)` still works: the additional wrapper `adopt_time_limit` (it adds none)
# hands N to the env as `max_steps` and drops the TimeLimit make put on top.
MANIPULATION_TASKS = ("BlockPulling", "BlockPushing", "BlockPicking", "DrawerOpening", "BlockInBowl", "BlockStacking",
                      "HouseBuilding", "CornerPicking")
# The same as scene.ADOPT_TIME_LIMIT, spelled out here so that registering does not import pybullet.
_ADOPT_TIME_LIMIT = _WrapperSpec(name="AdoptTimeLimit",
                                 entry_point="cleanrl_equi.envs.manipulation.scene:adopt_time_limit", kwargs={})
for _name in MANIPULATION_TASKS:
    if f"cleanrl_equi/{_name}-v0" not in _gym.registry:
        _gym.register(id=f"cleanrl_equi/{_name}-v0", entry_point=f"cleanrl_equi.envs.manipulation.tasks:{_name}Env",
                      additional_wrappers=(_ADOPT_TIME_LIMIT,))
