"""MuJoCo helpers for rpo_mujoco.py: env-id checks, the rendering backend for --capture-video with an early
rendering check, and the observation/reward normalisation statistics of CleanRL's continuous-control wrappers
(merge, save, restore).

CleanRL does not save these statistics with the model, so a saved policy is evaluated behind fresh normalisers
and acts on observations it never saw (CleanRL issues #425 and #532); rpo_mujoco.py saves and restores them.
"""

from __future__ import annotations

import ctypes
import os
import sys
from types import SimpleNamespace

import gymnasium as gym
import numpy as np

from cleanrl_equi.errors import fail


def check_env_id(env_id: str) -> None:
    """Stop with one sentence unless `env_id` names a gymnasium MuJoCo task that this machine can load."""
    check_gl_backend()
    examples = "HalfCheetah-v5, Hopper-v5, Walker2d-v5, Ant-v5 or Humanoid-v5"
    if env_id.startswith("ALE/") or "NoFrameskip" in env_id or _is_registered_atari(env_id):
        fail(f"{env_id} is an Atari game and this script trains MuJoCo tasks; use ppo_atari.py for Atari.")
    try:
        spec = gym.spec(env_id)
    except gym.error.Error:
        fail(f"unknown env id {env_id!r}; pass a gymnasium MuJoCo task such as {examples}.")
    entry_point = spec.entry_point if isinstance(spec.entry_point, str) else ""
    if not entry_point.startswith("gymnasium.envs.mujoco."):
        if (spec.version or 0) < 4 and f"{spec.name}-v5" in gym.registry:
            fail(f"{env_id} needs mujoco-py, which gymnasium 1.x no longer supports; use {spec.name}-v5.")
        fail(f"{env_id} is not a MuJoCo continuous-control task; pass one such as {examples}.")


def _is_registered_atari(env_id: str) -> bool:
    """Whether `env_id` is one of the Atari ids that ale-py registers (only known after importing ale_py)."""
    if env_id in gym.registry:
        return "ale_py" in str(gym.registry[env_id].entry_point)
    try:
        import ale_py
    except ImportError:
        return False
    gym.register_envs(ale_py)
    return env_id in gym.registry and "ale_py" in str(gym.registry[env_id].entry_point)


def check_gl_backend() -> None:
    """A MUJOCO_GL=egl of the user's own needs a loadable libEGL even without video: `import mujoco` reads it and,
    without the library, stops inside PyOpenGL (AttributeError: 'NoneType' object has no attribute
    'eglQueryString'). Say so in one sentence instead."""
    if sys.platform.startswith("linux") and os.environ.get("MUJOCO_GL", "").strip().lower() == "egl" \
            and not egl_loadable():
        fail("MUJOCO_GL=egl is set but libEGL cannot be loaded on this machine; install EGL (Debian: apt-get install "
             "libegl1 libegl-mesa0 libgl1-mesa-dri), or unset MUJOCO_GL (training needs no OpenGL without "
             "--capture-video).")


def egl_loadable() -> bool:
    """Whether this process can load libEGL under one of the names PyOpenGL tries (libEGL.so, libEGL.so.9 ... .0)."""
    for name in ["libEGL.so"] + [f"libEGL.so.{version}" for version in range(9, -1, -1)]:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def check_rendering(env_id: str) -> None:
    """Choose MuJoCo's OpenGL backend and render one frame, so a machine that cannot render fails now rather than
    at the first video. Called only for --capture-video: training alone never asks for an OpenGL backend."""
    # torch loads triton (with its own LLVM) lazily, the first time an optimizer is built. Loaded after Mesa's
    # software EGL (which brings another LLVM), it crashes the process with a segmentation fault, so load it first.
    import torch._dynamo  # noqa: F401
    # A Linux machine without a display has no window system for GLFW, so render through EGL there, unless the user
    # chose a backend with MUJOCO_GL themselves. With MUJOCO_GL=egl and no loadable libEGL, `import mujoco` stops
    # inside PyOpenGL with an AttributeError, so look for the library before asking for it.
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("MUJOCO_GL"):
        if not egl_loadable():
            fail(f"--capture-video needs OpenGL to render {env_id} and this machine has no display and no loadable "
                 "libEGL; install EGL (Debian: apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri) or OSMesa "
                 "(libosmesa6, then set MUJOCO_GL=osmesa), or train without --capture-video.")
        os.environ["MUJOCO_GL"] = "egl"
    try:
        env = gym.make(env_id, render_mode="rgb_array")
        env.reset(seed=0)
        env.render()
        env.close()
    except Exception as exc:
        fail(f"--capture-video cannot render {env_id} with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} "
             f"({type(exc).__name__}); install EGL (Debian: libegl1 libegl-mesa0 libgl1-mesa-dri) or OSMesa "
             "(libosmesa6) and set MUJOCO_GL=egl or MUJOCO_GL=osmesa.")


def normalizers(env: gym.Env) -> tuple[gym.wrappers.NormalizeObservation, gym.wrappers.NormalizeReward]:
    """The observation and reward normalisation wrappers inside one sub-env."""
    obs_norm = reward_norm = None
    while isinstance(env, gym.Wrapper):
        if isinstance(env, gym.wrappers.NormalizeObservation):
            obs_norm = env
        elif isinstance(env, gym.wrappers.NormalizeReward):
            reward_norm = env
        env = env.env
    assert obs_norm is not None and reward_norm is not None, "the env must have both normalisation wrappers"
    return obs_norm, reward_norm


def merged_statistics(rms_list) -> dict:
    """Combine running mean/variance/count trackers (one per sub-env) into one, as if they had seen all the data."""
    mean = np.array(rms_list[0].mean, dtype=np.float64)
    var = np.array(rms_list[0].var, dtype=np.float64)
    count = float(rms_list[0].count)
    for rms in rms_list[1:]:
        total = count + rms.count
        delta = rms.mean - mean
        mean = mean + delta * rms.count / total
        var = (var * count + rms.var * rms.count + np.square(delta) * count * rms.count / total) / total
        count = total
    return {"mean": mean, "var": var, "count": count}


def saved_statistics(checkpoint: dict, path: str) -> dict:
    """The normalisation statistics a saved policy is evaluated behind: a model file's (merged at --save-model), or a
    resume file's per-sub-env statistics (`NormalizationState`) merged the same way; one sentence if there are none."""
    if "obs_rms" in checkpoint and "return_rms" in checkpoint:
        return {"obs_rms": checkpoint["obs_rms"], "return_rms": checkpoint["return_rms"]}
    if "normalization" not in checkpoint.get("state", {}):
        fail(f"checkpoint {path!r} holds no normalisation statistics; pass a model file written with --save-model "
             "or a run's resume.pt.")

    def tracker(saved: dict):
        return SimpleNamespace(mean=np.asarray(saved["mean"]), var=np.asarray(saved["var"]),
                               count=float(saved["count"]))

    state = checkpoint["state"]["normalization"]
    return {name: merged_statistics([tracker(env[name]) for env in state]) for name in ("obs_rms", "return_rms")}


def training_statistics(envs: gym.vector.SyncVectorEnv) -> dict:
    """The normalisation statistics of all sub-envs, merged: what a saved policy needs to see as it saw in training."""
    pairs = [normalizers(env) for env in envs.envs]
    return {"obs_rms": merged_statistics([obs_norm.obs_rms for obs_norm, _ in pairs]),
            "return_rms": merged_statistics([reward_norm.return_rms for _, reward_norm in pairs])}


def restore_statistics(env: gym.Env, statistics: dict, freeze: bool = True) -> None:
    """Load saved normalisation statistics into one sub-env; freeze them (evaluation) or let them go on (resume)."""
    obs_norm, reward_norm = normalizers(env)
    for rms, saved in ((obs_norm.obs_rms, statistics["obs_rms"]), (reward_norm.return_rms, statistics["return_rms"])):
        rms.mean = np.array(saved["mean"], dtype=rms.mean.dtype).reshape(rms.mean.shape)
        rms.var = np.array(saved["var"], dtype=rms.var.dtype).reshape(rms.var.shape)
        rms.count = float(saved["count"])
    obs_norm.update_running_mean = not freeze
    reward_norm.update_running_mean = not freeze


class NormalizationState:
    """The statistics of every sub-env, not merged, as resumable state (`state_dict` / `load_state_dict`): a resumed
    run goes on normalising exactly as the interrupted one did."""

    def __init__(self, envs: gym.vector.SyncVectorEnv):
        self.envs = envs

    def state_dict(self) -> list[dict]:
        pairs = [normalizers(env) for env in self.envs.envs]
        return [{"obs_rms": merged_statistics([obs.obs_rms]), "return_rms": merged_statistics([ret.return_rms])}
                for obs, ret in pairs]

    def load_state_dict(self, state: list[dict]) -> None:
        if len(state) != len(self.envs.envs):
            raise ValueError(f"{len(state)} sub-envs were saved, {len(self.envs.envs)} are running")
        for env, statistics in zip(self.envs.envs, state):
            restore_statistics(env, statistics, freeze=False)


def evaluate_policy(act, make_env, statistics: dict, episodes: int, seed: int, device) -> tuple[list[float], list[int]]:
    """Returns and lengths of `episodes` episodes of `act(obs)` (a deterministic action) in the env `make_env()`
    builds (its wrappers, normalisers included), behind the saved normalisation statistics, frozen. One env seeded
    once with `seed` then autoresetting: the same inputs give the same episodes."""
    import torch

    envs = gym.vector.SyncVectorEnv([make_env], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    restore_statistics(envs.envs[0], statistics)
    obs, _ = envs.reset(seed=seed)
    returns, lengths = [], []
    while len(returns) < episodes:
        with torch.no_grad():
            action = act(torch.as_tensor(obs, dtype=torch.float32, device=device))
        obs, _, _, _, infos = envs.step(action.cpu().numpy())
        if "final_info" in infos and infos["final_info"].get("_episode", [False])[0]:
            returns.append(float(infos["final_info"]["episode"]["r"][0]))
            lengths.append(int(infos["final_info"]["episode"]["l"][0]))
            print(f"eval episode {len(returns) - 1}: return {returns[-1]:.6f}, length {lengths[-1]}")
    envs.close()
    print(f"eval mean return over {episodes} episodes: {np.mean(returns):.6f} +- {np.std(returns):.6f} "
          f"(deterministic mean action, frozen normalisation statistics, evaluation seed {seed})", flush=True)
    return returns, lengths
