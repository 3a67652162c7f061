"""cleanrl-equi: small shared building blocks for the single-file scripts at the repository root.

Importing the package silences escnn's warning about the optional `py3nj` package (used by escnn only for
3-D groups; every group here is 2-D) and registers the manipulation tasks with gymnasium.
"""

import warnings

import gymnasium as _gym

warnings.filterwarnings("ignore", message=".*py3nj", category=UserWarning)

# The eight manipulation tasks (cleanrl_equi/envs/manipulation/tasks.py). Entry points are strings, so pybullet is only
# imported when one of them is made. Episode limits are the envs' own `max_steps` kwarg (not a TimeLimit wrapper).
MANIPULATION_TASKS = ("BlockPulling", "BlockPushing", "BlockPicking", "DrawerOpening", "BlockInBowl", "BlockStacking",
                      "HouseBuilding", "CornerPicking")
for _name in MANIPULATION_TASKS:
    if f"cleanrl_equi/{_name}-v0" not in _gym.registry:
        _gym.register(id=f"cleanrl_equi/{_name}-v0", entry_point=f"cleanrl_equi.envs.manipulation.tasks:{_name}Env")
