"""cleanrl-equi: small shared building blocks for the single-file scripts at the repository root.

Importing the package silences escnn's warning about the optional `py3nj` package (used by escnn only for
3-D groups; every group here is 2-D), stands in for `lie_learn` where it is not installed (see below), and
registers the manipulation tasks with gymnasium.
"""

import importlib.util as _importlib_util
import sys as _sys
import types as _types
import warnings

import gymnasium as _gym
from gymnasium.envs.registration import WrapperSpec as _WrapperSpec

warnings.filterwarnings("ignore", message=".*py3nj", category=UserWarning)


def _wigner_d_needs_lie_learn(*args, **kwargs):
    raise ImportError("this escnn code computes SO(3) Wigner D-matrices, which need the `lie_learn` package; "
                      "cleanrl-equi uses 2-D groups only and does not install it (its wheels need NumPy 1.x and Python <= 3.12)")


# `import escnn` imports lie_learn's Wigner D-matrices for its 3-D groups (SO(3), O(3)), which no script here uses,
# and lie_learn's wheels are built for NumPy 1.x and Python <= 3.12 only. So the project does not install it (uv's
# override-dependencies) and registers a stand-in before escnn is imported: `import escnn` works, and 3-D code that
# would call into lie_learn stops with one clear sentence instead.
if _importlib_util.find_spec("lie_learn") is None and "lie_learn" not in _sys.modules:
    for _name in ("lie_learn", "lie_learn.representations", "lie_learn.representations.SO3",
                  "lie_learn.representations.SO3.wigner_d"):
        _sys.modules[_name] = _types.ModuleType(_name, "stand-in registered by cleanrl_equi: lie_learn is not installed")
    _sys.modules["lie_learn.representations.SO3.wigner_d"].wigner_D_matrix = _wigner_d_needs_lie_learn

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
