"""cleanrl_equi/datasets.py and the make_dataset tool: file format round trip, episodes as the env produced them, time-outs, sampling,
corrupt and mismatched files, the env settings a dataset records (and those of older files), the cached default
dataset, checkpoint (medium / mixed) data, and the CLI.

Small on purpose: 32x32 images and 2-3 episodes, so the whole file runs in well under a minute on one core.
"""

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import tyro

import cleanrl_equi  # noqa: F401  (registers the tasks)
from cleanrl_equi import datasets as od
from cleanrl_equi.checkpoints import save_checkpoint
from cleanrl_equi.envs.manipulation import BulletArmEnvArgs
from cleanrl_equi.tools import make_dataset as tool
from conftest import fails_with, load_script

ENV_ID = "cleanrl_equi/BlockPulling-v0"
SIZE = 32


def settings(**changes) -> dict:
    """Env settings as a script's Args gives them: BulletArm's defaults at SIZE px, with `changes`."""
    return {**BulletArmEnvArgs(env_id=ENV_ID, image_size=SIZE).env_settings(), **changes}


@pytest.fixture(scope="module")
def expert():
    return od.collect_expert(ENV_ID, num_episodes=3, seed=4, image_size=SIZE, max_steps=50)


@pytest.fixture(scope="module")
def expert_file(expert, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "expert.npz")
    od.save_dataset(path, expert)
    return path


def test_round_trip_is_exact(expert, expert_file):
    loaded = od.load_dataset(expert_file, ENV_ID, SIZE)
    for name, array in expert.arrays().items():
        assert getattr(loaded, name).dtype == array.dtype, name
        np.testing.assert_array_equal(getattr(loaded, name), array, err_msg=name)
    assert loaded.metadata == expert.metadata
    np.testing.assert_array_equal(loaded.obs_index, expert.obs_index)
    assert len(loaded) == len(expert) and loaded.num_episodes == 3
    assert not any(name.endswith(".tmp") for name in os.listdir(os.path.dirname(expert_file)))


def test_episodes_are_what_the_env_produced(expert):
    """T+1 observations per episode, the last being the true final observation (not the next episode's reset
    frame): replay every episode from its seed with the planner and compare every observation and action."""
    meta = expert.metadata
    assert meta["env_id"] == ENV_ID and meta["quality"] == "expert" and meta["policy"] == {"type": "planner"}
    assert meta["env_settings"] == settings(max_steps=50) and meta["seed"] == 4  # BulletArm's defaults
    assert meta["env_kwargs"] == BulletArmEnvArgs(image_size=SIZE, max_steps=50).env_kwargs()
    assert expert.heights.shape == (len(expert) + expert.num_episodes, SIZE, SIZE)
    np.testing.assert_array_equal(expert.episode_seeds, [4, 5, 6])
    env = gym.make(ENV_ID, image_size=SIZE, max_steps=50)
    for e in range(expert.num_episodes):
        episode = expert.episode(e)
        assert len(episode["observations"]) == len(episode["actions"]) + 1 == expert.episode_lengths[e] + 1
        obs, _ = env.reset(seed=int(expert.episode_seeds[e]))
        observations, actions = [obs], []
        while True:
            actions.append(env.unwrapped.expert_action())
            obs, _, terminated, truncated, _ = env.step(actions[-1])
            observations.append(obs)
            if terminated or truncated:
                break
        np.testing.assert_array_equal(episode["observations"], np.stack(observations))
        np.testing.assert_array_equal(episode["actions"], np.float32(actions))
        assert episode["terminations"][-1] and not episode["terminations"][:-1].any()
    env.close()


def test_planner_data_is_expert_and_succeeds(expert):
    assert expert.metadata["success_rate"] == 1.0 and expert.episode_successes().all()
    assert expert.expert.all() and not expert.truncations.any()
    assert expert.rewards.sum() == expert.num_episodes
    returns = 0.99 ** (expert.episode_lengths - 1)
    assert expert.metadata["discounted_return"] == pytest.approx(returns.mean())
    assert expert.metadata["num_transitions"] == len(expert) == expert.episode_lengths.sum()


def test_time_outs_are_truncations():
    data = od.collect_expert(ENV_ID, num_episodes=2, seed=0, image_size=SIZE, max_steps=2)
    np.testing.assert_array_equal(data.episode_lengths, [2, 2])
    np.testing.assert_array_equal(data.truncations, [False, True, False, True])
    assert not data.terminations.any() and data.metadata["success_rate"] == 0.0
    assert data.metadata["discounted_return"] == 0.0 and len(data.heights) == 6


def test_sample_batches(expert):
    np.random.seed(0)
    batch = expert.sample(64, "cpu")
    assert batch["obs"].shape == batch["next_obs"].shape == (64, 2, SIZE, SIZE)
    assert batch["obs"].dtype == batch["next_obs"].dtype == torch.float32
    assert batch["actions"].shape == (64, 5) and batch["actions"].dtype == torch.float32
    assert batch["rewards"].shape == batch["terminated"].shape == (64,)
    assert batch["terminated"].dtype == torch.float32 and batch["expert"].dtype == torch.bool
    assert 0 <= batch["obs"].min() and batch["obs"].max() <= 1 and batch["actions"].abs().max() <= 1
    assert set(batch["obs"][:, 1].unique().tolist()) <= {0.0, 1.0}
    # the same draw from NumPy's global generator, checked transition by transition against the episodes
    np.random.seed(0)
    index = np.random.randint(0, len(expert), size=64)
    all_obs = torch.as_tensor(expert.observations(np.arange(len(expert.heights)))).float() / 255
    rows = expert.obs_index[index]
    assert torch.equal(batch["obs"], all_obs[rows]) and torch.equal(batch["next_obs"], all_obs[rows + 1])
    assert torch.equal(batch["rewards"], torch.as_tensor(expert.rewards[index]))
    assert torch.equal(batch["actions"], torch.as_tensor(expert.actions[index]))
    # every transition's next_obs is the following observation of its own episode
    starts = np.cumsum(expert.episode_lengths) - expert.episode_lengths
    for e, (start, length) in enumerate(zip(starts, expert.episode_lengths, strict=True)):
        np.testing.assert_array_equal(expert.obs_index[start:start + length], start + e + np.arange(length))


def rewrite(path, out, change):
    """Copy a dataset file with `change(arrays)` applied to its arrays (the metadata, and its checksum, kept)."""
    with np.load(path) as file:
        arrays = {name: file[name].copy() for name in file.files}
    change(arrays)
    np.savez_compressed(out, **arrays)
    return str(out)


def test_bad_files_stop_with_one_sentence(expert_file, tmp_path, capsys):
    missing = str(tmp_path / "missing.npz")
    fails_with(capsys, ["does not exist", "cleanrl_equi.tools.make_dataset", ENV_ID], od.load_dataset, missing, ENV_ID)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(Path(expert_file).read_bytes()[:-300])
    fails_with(capsys, ["could not be read", "corrupt"], od.load_dataset, str(truncated))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a dataset at all")
    fails_with(capsys, ["corrupt"], od.load_dataset, str(garbage))

    def flip(arrays):
        arrays["actions"][1, 2] = -arrays["actions"][1, 2] + 0.5

    fails_with(capsys, ["checksum"], od.load_dataset, rewrite(expert_file, tmp_path / "flipped.npz", flip))
    fails_with(capsys, ["lacks", "rewards"], od.load_dataset,
               rewrite(expert_file, tmp_path / "no_rewards.npz", lambda a: a.pop("rewards")))

    def short(arrays):
        arrays["episode_lengths"][0] += 1

    fails_with(capsys, ["inconsistent"], od.load_dataset, rewrite(expert_file, tmp_path / "short.npz", short))
    fails_with(capsys, [ENV_ID, "cleanrl_equi/BlockPushing-v0"], od.load_dataset, expert_file,
               "cleanrl_equi/BlockPushing-v0", SIZE)
    fails_with(capsys, ["32x32", "128x128", "--image-size 32"], od.load_dataset, expert_file, ENV_ID, 128)


def test_bad_member_bytes_are_caught(expert_file, tmp_path, capsys):
    """A flipped byte inside the zip (not a rewritten array) is caught too, whichever layer notices first."""
    raw = bytearray(Path(expert_file).read_bytes())
    with zipfile.ZipFile(expert_file) as archive:
        info = archive.getinfo("heights.npy")
    middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    raw[middle] ^= 0xFF
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(bytes(raw))
    fails_with(capsys, [], od.load_dataset, str(damaged))


def test_default_dataset_is_built_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLEANRL_EQUI_DATA", str(tmp_path / "cache"))
    path = od.default_dataset(settings(), num_episodes=2, seed=1)
    assert capsys.readouterr().out.count("building the default dataset") == 1
    assert os.path.dirname(path) == str(tmp_path / "cache")
    assert os.path.basename(path) == "block_pulling_expert_2ep_32px_50steps_seed1.npz"
    data = od.load_dataset(path, ENV_ID, SIZE)
    assert data.num_episodes == 2 and data.metadata["success_rate"] == 1.0
    monkeypatch.setattr(od, "collect_expert", lambda *a, **k: pytest.fail("the cached dataset was rebuilt"))
    assert od.default_dataset(settings(), num_episodes=2, seed=1) == path
    assert capsys.readouterr().out == "" and os.listdir(tmp_path / "cache") == [os.path.basename(path)]
    # other env settings are another default dataset, under another name (the cached one is not theirs)
    other = od.dataset_filename(ENV_ID, "expert", 2, SIZE, 50, 1, settings(workspace_size=0.4))
    assert other.startswith("block_pulling_expert_2ep_32px_50steps_seed1_env") and other != os.path.basename(path)


# ---- Env settings -----------------------------------------------------------------------------------------------
def replay(dataset: od.OfflineDataset, env_kwargs: dict) -> bool:
    """Whether the planner, replayed from every episode's seed in gym.make(ENV_ID, **env_kwargs), gives exactly the
    dataset's observations, actions and rewards."""
    env = gym.make(ENV_ID, **env_kwargs)
    try:
        for e in range(dataset.num_episodes):
            episode = dataset.episode(e)
            obs, _ = env.reset(seed=int(dataset.episode_seeds[e]))
            observations, actions, rewards = [obs], [], []
            for _ in range(len(episode["actions"])):
                actions.append(env.unwrapped.expert_action())
                obs, reward, _, _, _ = env.step(actions[-1])
                observations.append(obs)
                rewards.append(reward)
            if not (np.array_equal(episode["observations"], np.stack(observations))
                    and np.array_equal(episode["actions"], np.float32(actions))
                    and np.array_equal(episode["rewards"], np.float32(rewards))):
                return False
        return True
    finally:
        env.close()


def test_make_dataset_collects_in_its_env_settings_and_records_them(tmp_path, monkeypatch, capsys):
    """Every env flag of BulletArmEnvArgs reaches the envs the tool collects with (the episodes replay exactly in
    those settings, not in BulletArm's defaults), and the metadata records them all; the default file name tells
    the settings apart."""
    monkeypatch.chdir(tmp_path)
    flags = ["--image-size", str(SIZE), "--max-steps", "5", "--num-episodes", "1", "--workspace-size", "0.4",
             "--drot-n", "8", "--action-rate-penalty", "0.5"]
    tool.main(tyro.cli(tool.Args, args=flags))
    (name,) = os.listdir(tmp_path / "datasets")
    assert name.startswith("block_pulling_expert_1ep_32px_5steps_seed0_env") and name.endswith(".npz")
    path = str(tmp_path / "datasets" / name)
    wide = settings(max_steps=5, workspace_size=0.4, drot_n=8, action_rate_penalty=0.5)
    data = od.load_dataset(path, env_settings=wide)
    assert data.metadata["env_settings"] == wide
    assert data.metadata["env_kwargs"] == BulletArmEnvArgs(**wide).env_kwargs()
    assert data.metadata["env_kwargs"]["workspace_size"] == 0.4 and data.metadata["env_kwargs"]["drot"] == np.pi / 8
    assert (data.rewards < 0).any()  # the action-rate penalty shaped the rewards
    assert replay(data, data.metadata["env_kwargs"])
    assert not replay(data, BulletArmEnvArgs(image_size=SIZE, max_steps=5).env_kwargs())
    capsys.readouterr()
    fails_with(capsys, ["was collected with --workspace-size 0.4 --drot-n 8 --action-rate-penalty 0.5",
                        "not --workspace-size 0.3 --drot-n 4 --action-rate-penalty 0.0",
                        "--image-size 32", "--max-steps 5"], od.load_dataset, path, env_settings=settings(max_steps=5))


def rewrite_metadata(path, out, change):
    """Copy a dataset file with `change(metadata)` applied to its metadata (the arrays, and so the checksum, kept)."""
    with np.load(path) as file:
        arrays = {name: file[name].copy() for name in file.files}
    metadata = json.loads(str(arrays.pop("metadata")))
    change(metadata)
    np.savez_compressed(out, metadata=np.array(json.dumps(metadata)), **arrays)
    return str(out)


def test_a_file_without_recorded_env_settings_was_collected_in_bulletarms(expert_file, tmp_path, capsys):
    """Files written before the env settings were recorded hold the image size and episode limit only: they are taken
    as collected with BulletArm's defaults, accepted at those settings and refused with the values to pass at others."""
    old = rewrite_metadata(expert_file, tmp_path / "old.npz", lambda m: m.pop("env_settings"))
    assert "env_settings" not in od.load_dataset(old).metadata
    assert od.recorded_env_settings(od.load_dataset(old).metadata) == settings(max_steps=50)
    assert od.load_dataset(old, env_settings=settings(max_steps=50)).num_episodes == 3
    fails_with(capsys, ["was collected with --workspace-size 0.3 --no-paper-tasks",
                        "pass --workspace-size 0.3 --no-paper-tasks"],
               od.load_dataset, old, env_settings=settings(max_steps=50, workspace_size=0.4, paper_tasks=True))
    fails_with(capsys, ["--max-steps 50", "not --max-steps 100"], od.load_dataset, old,
               env_settings=settings(max_steps=100))
    # recorded settings that contradict the file's own image size are a corrupt file
    bad = rewrite_metadata(expert_file, tmp_path / "bad.npz", lambda m: m["env_settings"].update(image_size=64))
    fails_with(capsys, ["inconsistent", "env settings"], od.load_dataset, bad)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained sac_equi_bullet actor saved as --save-model does: greedy roll-outs that (almost surely) fail."""
    sac = load_script("sac_equi_bullet")
    args = sac.Args(env_id=ENV_ID, image_size=SIZE, max_steps=50, model="equi", group_order=4, n_hidden=8,
                    workspace_size=0.3, drot_n=4, paper_tasks=False)  # the datasets' (BulletArm's) env setting
    torch.manual_seed(0)
    actor = sac.EquiActor(args)
    path = str(tmp_path_factory.mktemp("ckpt") / "sac_equi_bullet.cleanrl_model")
    save_checkpoint(path, "sac_equi_bullet", args, actor=actor.state_dict())
    return path


def test_checkpoint_of_another_env_setting_is_refused(tmp_path, capsys):
    """sac_equi_bullet.py trains in the ICLR paper's setting by default; the datasets use BulletArm's unless told
    otherwise, and then the checkpoint collects in its own setting."""
    sac = load_script("sac_equi_bullet")
    args = sac.Args(env_id=ENV_ID, image_size=SIZE, model="equi", group_order=4, n_hidden=8)
    path = str(tmp_path / "paper.cleanrl_model")
    save_checkpoint(path, "sac_equi_bullet", args, actor=sac.EquiActor(args).state_dict())
    fails_with(capsys, ["another env setting", "--workspace-size 0.4", "--no-paper-tasks"], tool.collect_medium, path,
               env_id=ENV_ID, num_episodes=1, seed=0, image_size=SIZE, max_steps=4, eval_episodes=1)
    paper = {**args.env_settings(), "max_steps": 4}
    medium = tool.collect_medium(path, env_id=ENV_ID, num_episodes=1, seed=0, image_size=SIZE, max_steps=4,
                                 eval_episodes=1, reward_limit=0.0, env_settings=paper)
    assert medium.metadata["env_settings"] == paper and medium.metadata["env_settings"]["paper_tasks"]


def test_medium_and_mixed_from_a_checkpoint(checkpoint, tmp_path, capsys):
    common = dict(env_id=ENV_ID, seed=3, image_size=SIZE, max_steps=4, eval_episodes=2)
    fails_with(capsys, ["below --reward-limit 2"], tool.collect_medium, checkpoint, num_episodes=2, reward_limit=2.0,
               **common)
    fails_with(capsys, ["BlockPulling", "--env-id"], tool.collect_medium, checkpoint, num_episodes=2,
               **{**common, "env_id": "cleanrl_equi/BlockPushing-v0"})
    medium = tool.collect_medium(checkpoint, num_episodes=2, reward_limit=0.0, **common)
    meta = medium.metadata
    assert meta["quality"] == "medium" and not medium.expert.any() and medium.num_episodes == 2
    assert meta["policy"]["type"] == "checkpoint" and meta["policy"]["script"] == "sac_equi_bullet.py"
    assert meta["policy"]["path"] == os.path.abspath(checkpoint) and "eval_discounted_return" in meta["policy"]
    assert np.abs(medium.actions).max() <= 1
    mixed = tool.collect_mixed(checkpoint, num_episodes=3, expert_fraction=0.34, reward_limit=0.0, **common)
    assert mixed.metadata["quality"] == "mixed" and mixed.num_episodes == 3
    assert mixed.metadata["policy"]["expert_episodes"] == 1 and mixed.metadata["policy"]["medium_episodes"] == 2
    np.testing.assert_array_equal(mixed.episode_seeds, [3, 4, 5])
    first = mixed.episode_lengths[0]
    assert mixed.expert[:first].all() and not mixed.expert[first:].any()
    path = str(tmp_path / "mixed.npz")
    od.save_dataset(path, mixed)
    assert od.load_dataset(path, ENV_ID, SIZE).metadata == mixed.metadata


def run_cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "cleanrl_equi.tools.make_dataset", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_collects_reports_and_refuses(tmp_path, capsys):
    """One real command line in a subprocess (collection, summary line); --info and the refusals in-process."""
    proc = run_cli("--image-size", str(SIZE), "--num-episodes", "2", "--max-steps", "20", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "datasets" / "block_pulling_expert_2ep_32px_20steps_seed0.npz"
    assert path.is_file() and "2 episodes" in proc.stdout and "success rate 1.000" in proc.stdout
    capsys.readouterr()
    tool.main(tyro.cli(tool.Args, args=["--info", str(path)]))
    out = capsys.readouterr().out
    assert json.loads(out[:out.rindex("}") + 1])["num_episodes"] == 2 and "heights" in out
    for args, words in ((["--info", "nope.npz"], "does not exist"),
                        (["--quality", "medium"], "needs --checkpoint"),
                        (["--checkpoint", "x.cleanrl_model"], "only used with --quality medium"),
                        (["--num-episodes", "0"], "at least 1"),
                        (["--workspace-size", "0.1"], "--workspace-size")):
        fails_with(capsys, [words], tool.main, tyro.cli(tool.Args, args=args))
    # the task and the quality are choices: tyro refuses anything else, naming the choices
    for args, choices in ((["--env-id", "cleanrl_equi/NoSuchTask-v0"], ["NoSuchTask", ENV_ID]),
                          (["--quality", "best"], ["best", "expert", "medium", "mixed"])):
        with pytest.raises(SystemExit) as raised:
            tyro.cli(tool.Args, args=args)
        assert raised.value.code != 0
        err = capsys.readouterr().err
        assert all(choice in err for choice in choices), err
    if importlib.util.find_spec("minari") is None:  # an optional extra: the export says how to get it, up front
        fails_with(capsys, ["needs the `minari` package"], tool.main, tyro.cli(tool.Args, args=["--to-minari", "x-v0"]))


def test_export_to_minari_keeps_every_episode(expert, tmp_path, monkeypatch):
    """The `minari` extra (in the dev group, so CI runs this): the exported dataset loads with Minari and holds the
    same episodes (T+1 observations, actions, rewards, terminations, truncations), and recovers our env."""
    minari = pytest.importorskip("minari", reason="install the `minari` extra: uv sync --extra minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    od.to_minari(expert, "cleanrl_equi/BlockPulling/expert-v0")
    exported = minari.load_dataset("cleanrl_equi/BlockPulling/expert-v0")
    assert exported.total_episodes == expert.num_episodes and exported.total_steps == len(expert)
    for e, episode in enumerate(exported.iterate_episodes()):
        ours = expert.episode(e)
        for key in ("observations", "actions", "rewards", "terminations", "truncations"):
            np.testing.assert_array_equal(getattr(episode, key), ours[key])
    env = exported.recover_environment()
    assert env.unwrapped.image_size == SIZE
    env.close()


def test_an_existing_file_is_never_replaced_unasked(tmp_path, capsys):
    """make_dataset refuses an --out that exists (a real second command), replaces it only with --overwrite; the
    hint of a dataset error never names a model or resume file as the place to collect into."""
    flags = ["--image-size", str(SIZE), "--num-episodes", "1", "--max-steps", "5", "--out", "data.npz"]
    assert run_cli(*flags, cwd=tmp_path).returncode == 0
    before = (tmp_path / "data.npz").read_bytes()
    again = run_cli(*flags, "--seed", "7", cwd=tmp_path)
    assert again.returncode != 0 and "already exists; pass --overwrite" in again.stderr
    assert "Traceback" not in again.stderr and (tmp_path / "data.npz").read_bytes() == before
    assert run_cli(*flags, "--seed", "7", "--overwrite", cwd=tmp_path).returncode == 0
    assert (tmp_path / "data.npz").read_bytes() != before
    model = tmp_path / "sac_equi_bullet.cleanrl_model"
    model.write_bytes(b"weights")
    capsys.readouterr()
    fails_with(capsys, ["could not be read", "--out datasets/<name>.npz`"], od.load_dataset, str(model))
    assert model.read_bytes() == b"weights"
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"garbage")
    fails_with(capsys, [f"--out {corrupt} --overwrite`"], od.load_dataset, str(corrupt))
