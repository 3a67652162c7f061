"""Size and write time of sac_equi_bullet.py's resume file, whose largest part is the replay buffer.

The resume file holds the filled rows of the buffer only (each observation once, as a uint8 height map and one
holding bit). This fills a buffer of the paper's size (100k transitions, 5 envs, 128 px) to several levels with
random observations and writes the buffer part of the resume file as the script does, next to what writing the
whole buffer (what the file held before) costs.

    uv run python benchmarks/resume_file_size.py
"""

import json
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from common import REPO, Output, cli, load_script, machine_info, results_path


@dataclass
class Args(Output):
    capacity: int = 100_000
    """replay buffer capacity in transitions (the paper's 100k)"""
    num_envs: int = 5
    """parallel envs (rows of the buffer hold one transition per env)"""
    image_size: int = 128
    """observation size in pixels"""
    fill_levels: str = "0.01,0.1,0.5,1.0"
    """comma-separated fractions of the buffer filled before the resume file is written"""
    folder: str = ""
    """where to write the files (default: a temporary folder on the same disk as this checkout)"""


def load_sac():
    return load_script("sac_equi_bullet")


def write(state, folder: str) -> tuple[float, int]:
    path = os.path.join(folder, "buffer.pt")
    start = time.time()
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    seconds, size = time.time() - start, os.path.getsize(path)
    os.remove(path)
    return seconds, size


def main(args: Args) -> None:
    out = results_path(args, "resume_file_size.json")
    sac = load_sac()
    rb = sac.ReplayBuffer(args.capacity, args.num_envs, args.image_size)
    rng = np.random.default_rng(0)
    obs = rng.integers(0, 256, (args.num_envs, 2, args.image_size, args.image_size), dtype=np.uint8)
    rb.start(obs)
    rows_done, results = 0, []
    folder = args.folder or tempfile.mkdtemp(dir=REPO)
    for level in (float(x) for x in args.fill_levels.split(",")):
        target = int(level * rb.rows) - 1
        while rows_done < target:
            obs[:, 0] = rng.integers(0, 256, obs[:, 0].shape, dtype=np.uint8)
            rb.add(np.zeros((args.num_envs, 5), np.float32), np.zeros(args.num_envs), np.zeros(args.num_envs, bool),
                   np.ones(args.num_envs, bool), np.zeros(args.num_envs, bool), obs)
            rows_done += 1
        seconds, size = write(rb.state_dict(), folder)
        results.append({"filled_fraction": level, "transitions": len(rb), "bytes": size, "seconds": round(seconds, 2)})
        print(f"{len(rb):7d} transitions ({level:.0%} full): {size / 1e6:8.1f} MB in {seconds:.2f} s", flush=True)
    whole = {"pos": rb.pos, **{k: v for k, v in vars(rb).items() if isinstance(v, np.ndarray)}}
    seconds, size = write(whole, folder)
    print(f"the whole buffer, as before: {size / 1e6:.1f} MB in {seconds:.2f} s (at any fill level)", flush=True)
    if not args.folder:
        os.rmdir(folder)
    with open(out, "w") as f:
        json.dump({"machine": machine_info(), "capacity": args.capacity, "num_envs": args.num_envs,
                   "image_size": args.image_size, "filled_rows_only": results,
                   "whole_buffer": {"bytes": size, "seconds": round(seconds, 2)}}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(cli(Args, description=__doc__.split("\n\n")[0]))
