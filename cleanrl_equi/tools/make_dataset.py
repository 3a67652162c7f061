"""Make an offline dataset of a manipulation task: planner episodes ("expert"), greedy roll-outs of a saved agent
("medium"), or both ("mixed"); print a dataset's metadata; export one to Minari.

    uv run python -m cleanrl_equi.tools.make_dataset --env-id cleanrl_equi/BlockPulling-v0 --quality expert \\
        --num-episodes 10 --out datasets/block_pulling_expert.npz
    uv run python -m cleanrl_equi.tools.make_dataset --quality medium --checkpoint runs/<run>/sac_equi_bullet.cleanrl_model
    uv run python -m cleanrl_equi.tools.make_dataset --info datasets/block_pulling_expert.npz

The env settings are `BulletArmEnvArgs`' flags (`--workspace-size`, `--drot-n`, `--max-steps`, ...; BulletArm's
defaults), the same flags as the offline scripts', and the dataset records them: a script refuses a dataset collected
in other settings than its own.

A medium dataset needs the agent's actor. The networks live in the training scripts, so the checkpoint's script
(it records its name) is loaded from the repository and its `load_actor(path, device)` rebuilds the actor; this
tool turns it into a policy callable for `cleanrl_equi.datasets.collect_episodes`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

import numpy as np
import torch

import cleanrl_equi
from cleanrl_equi.datasets import (GAMMA, OfflineDataset, collect_episodes, collect_expert, collection_settings,
                                   concatenate, dataset_filename, env_flags, import_minari, load_dataset, save_dataset,
                                   to_minari)
from cleanrl_equi.envs.manipulation import BulletArmEnvArgs, evaluate, obs_to_tensor
from cleanrl_equi.errors import fail

EVAL_SEED_OFFSET = 1_000_000  # a checkpoint's evaluation uses scenes far from the collected ones
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(cleanrl_equi.__file__)))


def load_script(script: str):
    """The training script `script` (e.g. "sac_equi_bullet") as a module, from the repository or the working folder
    (its training code runs only under `__main__`, so importing it builds nothing)."""
    for folder in (REPOSITORY, os.getcwd()):
        path = os.path.join(folder, f"{script}.py")
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location(f"cleanrl_equi_script_{script}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    fail(f"the checkpoint was written by {script}.py, which is not in {REPOSITORY} or the working folder; run this "
         "tool from the repository.")


def greedy_policy(actor: torch.nn.Module, device: Union[str, torch.device]) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 observations (B, 2, S, S) -> the actor's deterministic actions tanh(mean), as NumPy (B, 5)."""
    actor.eval()  # nothing is updated while collecting

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        mean, _ = actor(obs_to_tensor(obs, device))
        return torch.tanh(mean).cpu().numpy()

    return act


def load_medium_policy(checkpoint_path: str, env_id: str, image_size: int, max_steps: int, reward_limit: float,
                       eval_episodes: int, seed: int, device: Union[str, torch.device] = "cpu",
                       num_eval_envs: int = 5, env_settings: Optional[dict] = None):
    """Load a saved actor, evaluate it greedily on `eval_episodes` episodes in the collection's env settings
    (`env_settings`; None: BulletArm's defaults), and refuse it (one sentence) if it was trained in another task,
    image size or env geometry, or if its mean discounted return is below `reward_limit`. Returns (policy callable,
    policy_info for the metadata)."""
    device = torch.device(device)
    settings = collection_settings(env_id, image_size, max_steps, env_settings).env_settings()
    script = "sac_equi_bullet"  # the agents whose greedy roll-outs the paper calls medium data
    actor, saved = load_script(script).load_actor(checkpoint_path, device)
    if saved.env_id != env_id:
        fail(f"checkpoint {checkpoint_path!r} was trained on {saved.env_id}, not {env_id}; pass --env-id "
             f"{saved.env_id} or a checkpoint of {env_id}.")
    if saved.image_size != image_size:
        fail(f"checkpoint {checkpoint_path!r} was trained on {saved.image_size}-px images, not {image_size}; pass "
             f"--image-size {saved.image_size}.")
    # the geometry of the task (workspace, step sizes, task sizes) must be the one the actor was trained in
    trained = vars(saved)
    other = [name for name in ("workspace_size", "dpos", "drot_n", "paper_tasks") if trained[name] != settings[name]]
    if other:
        fail(f"checkpoint {checkpoint_path!r} was trained in another env setting ({env_flags(trained, other)}) than "
             f"this collection's ({env_flags(settings, other)}); pass {env_flags(trained, other)} to collect in its "
             f"setting, or train it with {env_flags(settings, other)}.")
    if eval_episodes < 1:
        fail("--eval-episodes must be at least 1: a checkpoint is evaluated before it collects data.")
    for name, value in settings.items():  # judged in the envs the data will come from (their time limit too)
        setattr(saved, name, value)
    saved.gamma = GAMMA  # and with the papers' gamma
    saved.eval_episodes, saved.num_eval_envs = eval_episodes, num_eval_envs
    result = evaluate(actor, saved, device, seed=seed + EVAL_SEED_OFFSET)
    print(f"checkpoint {checkpoint_path}: discounted return {result['discounted_return']:.4f}, success rate "
          f"{result['success_rate']:.3f} over {eval_episodes} evaluation episodes", flush=True)
    if result["discounted_return"] < reward_limit:
        fail(f"checkpoint {checkpoint_path!r} reaches a discounted return of {result['discounted_return']:.4f} over "
             f"{eval_episodes} episodes, below --reward-limit {reward_limit}; train it longer or lower the limit.")
    info = {"type": "checkpoint", "path": os.path.abspath(checkpoint_path), "script": f"{script}.py",
            "model": saved.model, "eval_episodes": eval_episodes,
            "eval_discounted_return": result["discounted_return"], "eval_success_rate": result["success_rate"],
            "reward_limit": reward_limit, "action": "tanh(mean)"}
    return greedy_policy(actor, device), info


def collect_medium(checkpoint_path: str, env_id: str, num_episodes: int, seed: int, image_size: int = 128,
                   max_steps: int = 50, reward_limit: float = 0.4, eval_episodes: int = 100,
                   device: Union[str, torch.device] = "cpu", env_settings: Optional[dict] = None,
                   **kwargs) -> OfflineDataset:
    """Greedy roll-outs of a saved actor that first passes the `reward_limit` evaluation ("medium" quality), in the
    env settings `env_settings` (None: BulletArm's defaults)."""
    policy, info = load_medium_policy(checkpoint_path, env_id, image_size, max_steps, reward_limit, eval_episodes,
                                      seed, device, env_settings=env_settings)
    return collect_episodes(env_id, num_episodes, seed, image_size, max_steps, policy, quality="medium",
                            policy_info=info, env_settings=env_settings, **kwargs)


def collect_mixed(checkpoint_path: str, env_id: str, num_episodes: int, seed: int, image_size: int = 128,
                  max_steps: int = 50, expert_fraction: float = 0.5, reward_limit: float = 0.4,
                  eval_episodes: int = 100, device: Union[str, torch.device] = "cpu",
                  env_settings: Optional[dict] = None, **kwargs) -> OfflineDataset:
    """round(expert_fraction * num_episodes) planner episodes (seeds seed, seed+1, ...) followed by medium episodes
    of the checkpoint (the next seeds), in one dataset ("mixed" quality), in the env settings `env_settings`."""
    if not 0.0 <= expert_fraction <= 1.0:
        fail(f"--expert-fraction must be in [0, 1], not {expert_fraction}.")
    num_expert = int(round(expert_fraction * num_episodes))
    policy, info = load_medium_policy(checkpoint_path, env_id, image_size, max_steps, reward_limit, eval_episodes,
                                      seed, device, env_settings=env_settings)
    parts = []
    if num_expert > 0:
        parts.append(collect_episodes(env_id, num_expert, seed, image_size, max_steps, "planner",
                                      env_settings=env_settings, **kwargs))
    if num_episodes - num_expert > 0:
        parts.append(collect_episodes(env_id, num_episodes - num_expert, seed + num_expert, image_size, max_steps,
                                      policy, env_settings=env_settings, **kwargs))
    mixed_info = {"type": "mixed", "expert_fraction": expert_fraction, "expert_episodes": num_expert,
                  "medium_episodes": num_episodes - num_expert, "expert": {"type": "planner"}, "medium": info}
    return concatenate(parts, "mixed", mixed_info, seed)


# ---- Command line ---------------------------------------------------------------------------------------------------
@dataclass
class Args(BulletArmEnvArgs):
    # The env: the task and its settings come from BulletArmEnvArgs (BulletArm's defaults); a time-out at
    # --max-steps is stored as a truncation
    quality: Literal["expert", "medium", "mixed"] = "expert"
    """expert = planner episodes, medium = greedy roll-outs of --checkpoint, mixed = both"""
    num_episodes: int = 10
    """the number of whole episodes to collect"""
    seed: int = 0
    """episode i starts from reset(seed=seed + i)"""
    out: Optional[str] = None
    """the output file (default: datasets/<task>_<quality>_<episodes>ep_<size>px_<steps>steps_seed<seed>.npz, with
    `_env<hash>` before `.npz` in other env settings than BulletArm's)"""
    checkpoint: Optional[str] = None
    """for medium / mixed: a sac_equi_bullet.py model saved with --save-model"""
    reward_limit: float = 0.4
    """refuse a checkpoint whose evaluation discounted return is below this (0.4 = the paper's "medium")"""
    expert_fraction: float = 0.5
    """for mixed: the fraction of episodes that come from the planner"""
    eval_episodes: int = 100
    """episodes of the checkpoint's evaluation before it collects"""
    cuda: bool = True
    """run the checkpoint's actor on the GPU when there is one"""
    info: Optional[str] = None
    """print this dataset's metadata and array shapes instead of collecting"""
    to_minari: Optional[str] = None
    """also export the dataset at --out (collected first if the file does not exist) as this Minari dataset id"""
    overwrite: bool = False
    """replace the --out file if it exists (without this flag an existing file is never replaced)"""


def print_info(path: str) -> None:
    dataset = load_dataset(path)
    shown = dict(dataset.metadata)
    if "episode_metrics" in shown:  # one value per episode: the means (metric_means) say it in one line each
        shown["episode_metrics"] = f"{len(shown['episode_metrics'])} metrics x {dataset.metadata['num_episodes']} episodes"
    print(json.dumps(shown, indent=2))
    for name, array in dataset.arrays().items():
        print(f"{name:16s} {str(array.dtype):8s} {array.shape}")
    print(f"file size {os.path.getsize(path) / 1e6:.2f} MB")


def summary_line(path: str, dataset: OfflineDataset, seconds: float) -> str:
    meta = dataset.metadata
    return (f"{path}: {meta['quality']} {meta['env_id']}, {meta['num_episodes']} episodes, {meta['num_transitions']} "
            f"transitions, success rate {meta['success_rate']:.3f}, discounted return {meta['discounted_return']:.4f}, "
            f"{os.path.getsize(path) / 1e6:.2f} MB, {seconds:.1f} s")


def main(args: Args) -> None:
    if args.info is not None:
        print_info(args.info)
        return
    if args.num_episodes < 1:
        fail(f"--num-episodes must be at least 1, not {args.num_episodes}.")
    args.check_env_settings()
    if args.quality == "expert" and args.checkpoint is not None:
        fail("--checkpoint is only used with --quality medium or mixed; drop it for planner data.")
    if args.quality != "expert" and args.checkpoint is None:
        fail(f"--quality {args.quality} needs --checkpoint, a sac_equi_bullet.py model saved with --save-model.")
    out = args.out or os.path.join("datasets", dataset_filename(args.env_id, args.quality, args.num_episodes,
                                                                args.image_size, args.max_steps, args.seed,
                                                                args.env_settings()))
    if args.to_minari is not None:
        import_minari()  # before a long collection, not after it
    if args.to_minari is not None and os.path.isfile(out):
        to_minari(load_dataset(out, env_settings=args.env_settings()), args.to_minari)
        print(f"exported {out} as Minari dataset {args.to_minari!r}")
        return
    if not out.endswith(".npz"):
        fail(f"--out {out} must end in .npz (datasets are NumPy .npz archives).")
    if os.path.exists(out) and not args.overwrite:
        fail(f"{out} already exists; pass --overwrite to replace it, or another --out.")
    device = "cuda" if args.cuda and torch.cuda.is_available() else "cpu"
    start = time.time()
    common = dict(env_id=args.env_id, num_episodes=args.num_episodes, seed=args.seed, image_size=args.image_size,
                  max_steps=args.max_steps, env_settings=args.env_settings(), progress_interval=30.0)
    medium = dict(checkpoint_path=args.checkpoint, reward_limit=args.reward_limit, eval_episodes=args.eval_episodes,
                  device=device)
    if args.quality == "expert":
        dataset = collect_expert(**common)
    elif args.quality == "medium":
        dataset = collect_medium(**medium, **common)
    else:
        dataset = collect_mixed(**medium, **common, expert_fraction=args.expert_fraction)
    save_dataset(out, dataset)
    print(summary_line(out, dataset, time.time() - start), flush=True)
    if args.to_minari is not None:
        to_minari(dataset, args.to_minari)
        print(f"exported {out} as Minari dataset {args.to_minari!r}")


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))
