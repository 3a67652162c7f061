"""The slurm/ templates on a real single-node SLURM cluster, started here from the Debian packages: a job array of
seeds x variants runs to the end, and a job warned the way SLURM warns before the wall-time limit
(`--signal=B:USR1@...`) writes its resume file, requeues itself and finishes from where it stopped.

Needs root and `apt-get install slurmctld slurmd slurm-client munge` (CI does that); skipped otherwise.
"""

import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, read_scalars

pytestmark = pytest.mark.xdist_group("slurm")  # one cluster for the module under `--dist loadgroup`
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
# the tiny PPO run of tests/test_atari.py: 256 steps
TINY = ["--num-envs", "2", "--num-steps", "32", "--total-timesteps", "256", "--num-minibatches", "2"]
# what the templates ask for (a GPU, 32 cores, 30G, 4 h) does not fit this node: ask for what it has
SMALL_JOB = ["--gres=none", "--cpus-per-task=1", "--mem=600M", "--time=10"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    with open("/proc/meminfo") as meminfo:
        total_kb = int(re.search(r"MemTotal:\s+(\d+)", meminfo.read()).group(1))
    return total_kb // 1024


def _wait_for(condition, timeout: float, what: str, logs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    tails = "".join(f"\n--- {path}:\n{_tail(path)}" for path in logs)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{tails}")


def _tail(path: str, lines: int = 30) -> str:
    if not os.path.exists(path):
        return "(missing)"
    with open(path, errors="replace") as file:
        return "".join(file.readlines()[-lines:])


class Cluster:
    """A running munged + slurmctld + slurmd in `root`, and the environment that points the clients at them."""

    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.munge_socket = os.path.join(root, "munge", "munge.socket")
        self.logs = [os.path.join(root, name) for name in ("slurmctld.log", "slurmd.log", "munged.log")]
        self.processes: list[subprocess.Popen] = []
        self.job_ids: list[str] = []
        # the clients find the cluster through SLURM_CONF; anything SLURM-ish of an outer job must not leak in
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_"))}
        self.env["SLURM_CONF"] = self.conf

    def start(self) -> None:
        for sub in ("munge", "state", "spool"):
            os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)
        key = os.path.join(self.root, "munge", "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o400), "wb") as file:
            file.write(os.urandom(1024))
        # --force: a temporary directory is not laid out the way munged wants /etc/munge and /run/munge to be
        self._spawn(["munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                     f"--pid-file={self.root}/munge/munged.pid", f"--log-file={self.root}/munged.log",
                     f"--seed-file={self.root}/munge/munged.seed"])
        _wait_for(lambda: os.path.exists(self.munge_socket), 15, "munged's socket", self.logs)

        host = socket.gethostname().split(".")[0]
        with open(self.conf, "w") as file:
            file.write(f"""\
ClusterName=cleanrltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: track processes through /proc, bind nothing, account nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={len(os.sched_getaffinity(0))} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn(["slurmctld", "-D", "-c", "-f", self.conf])
        self._spawn(["slurmd", "-D", "-f", self.conf])
        _wait_for(lambda: self.node_state() in ("idle", "mix", "alloc"), 30, "the node to come up idle", self.logs)

    def _spawn(self, command: list[str]) -> None:
        with open(os.path.join(self.root, f"{command[0]}.stdout"), "w") as log:
            self.processes.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def run(self, *command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(command, env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              timeout=30, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def node_state(self) -> str:
        proc = self.run("sinfo", "--noheader", "--format=%t", check=False)
        return proc.stdout.strip().rstrip("*~#!%$@^-") if proc.returncode == 0 else ""

    def sbatch(self, *args: str, cwd: str, env: dict) -> str:
        proc = self.run("sbatch", "--parsable", *args, cwd=cwd, env=dict(self.env, **env))
        job_id = proc.stdout.strip().split(";")[0]
        self.job_ids.append(job_id)
        return job_id

    def job(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` as one {field: value} per job (an array gives one per task)."""
        proc = self.run("scontrol", "show", "job", "--oneliner", job_id, check=False)
        return [dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", line)) for line in proc.stdout.splitlines() if line.strip()]

    def wait_until_done(self, job_id: str, timeout: float) -> list[dict[str, str]]:
        done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")

        def finished():
            tasks = self.job(job_id)
            return tasks if tasks and all(task["JobState"] in done for task in tasks) else None

        return _wait_for(finished, timeout, f"job {job_id} to finish", self.logs)

    def stop(self) -> None:
        for job_id in self.job_ids:
            self.run("scancel", job_id, check=False)
        if self.job_ids:  # let slurmd end the job processes it started before it goes itself
            try:
                _wait_for(lambda: not self.run("squeue", "--noheader", check=False).stdout.strip(), 20, "cancel")
            except AssertionError:
                pass
        for proc in reversed(self.processes):
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the SLURM tests start munged, slurmctld and slurmd as root: run them as root, with "
                    "`apt-get install slurmctld slurmd slurm-client munge` done")
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"SLURM is not installed (no {', '.join(missing)}): "
                    "`apt-get install slurmctld slurmd slurm-client munge` (Debian/Ubuntu) to run these tests")
    cluster = Cluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _template_env(**extra: str) -> dict[str, str]:
    """What a user sets before sbatch: the already-synced environment (this interpreter's venv), nothing else."""
    return {"VENV": sys.prefix, "PYTHONWARNINGS": "ignore", **extra}


def _iteration_steps(run_dir: str) -> list[int]:
    """The global steps of the once-per-iteration scalar, in the order they were logged."""
    return [step for step, _ in read_scalars(run_dir)["charts/SPS"]]


def test_array_runs_every_seed_and_variant(cluster, tmp_path):
    workdir = str(tmp_path)
    env = _template_env(SCRIPT="ppo_atari.py", SEEDS="1 2", VARIANTS="--num-envs 2;--num-envs 4")
    # submitted from the repository (SLURM_SUBMIT_DIR, where slurm/run.sh is found), running in workdir
    array_id = cluster.sbatch(*SMALL_JOB, "--array=0-3", f"--chdir={workdir}", "slurm/array.sbatch", *TINY,
                              cwd=REPO, env=env)
    tasks = cluster.wait_until_done(array_id, timeout=300)
    logs = {t: os.path.join(workdir, f"cleanrl_array-{array_id}_{t}.out") for t in range(4)}
    assert sorted(int(t["ArrayTaskId"]) for t in tasks) == [0, 1, 2, 3]
    for task in tasks:
        log = logs[int(task["ArrayTaskId"])]
        assert task["JobState"] == "COMPLETED", f"task {task['ArrayTaskId']}: {task['JobState']}\n{_tail(log)}"

    for task, (seed, num_envs) in enumerate([(1, 2), (1, 4), (2, 2), (2, 4)]):
        text = open(logs[task]).read()
        assert f"array task {task}: seed {seed}, variant '--num-envs {num_envs}'" in text, text
        assert "step 256/256" in text, text
        run_dir = os.path.join(workdir, "runs", f"BreakoutNoFrameskip-v4__ppo_atari__{seed}__slurm{array_id}_{task}")
        assert os.path.isdir(run_dir), f"no {run_dir}: {os.listdir(os.path.join(workdir, 'runs'))}"
        batch = 32 * num_envs
        assert _iteration_steps(run_dir) == list(range(batch, 257, batch)), run_dir


def _submit_resumable_ppo(cluster, workdir: str, total: int) -> tuple[str, str]:
    """Submit slurm/ppo_atari.sbatch for `total` steps, 64 per iteration; wait until it has logged an iteration
    (its signal handlers are in place then). Returns the job id and its log file."""
    with open(os.path.join(REPO, "ppo_atari.py")) as source:
        if "checkpoint_minutes" not in source.read():
            pytest.skip("ppo_atari.py has no --checkpoint-minutes yet (resume on requeue not implemented)")
    flags = ["--num-envs", "2", "--num-steps", "32", "--total-timesteps", str(total), "--num-minibatches", "2",
             "--update-epochs", "1", "--progress-interval", "0", "--checkpoint-minutes", "0"]
    job_id = cluster.sbatch(*SMALL_JOB, f"--chdir={workdir}", "slurm/ppo_atari.sbatch", *flags, cwd=REPO,
                            env=_template_env())
    log = os.path.join(workdir, f"ppo_atari-{job_id}.out")

    def progress() -> int:
        steps = re.findall(r"^step (\d+)/", open(log).read(), re.M) if os.path.exists(log) else []
        return int(steps[-1]) if steps else 0

    _wait_for(lambda: progress() >= 64, 120, "the job to make progress", [log, *cluster.logs])
    return job_id, log


def test_time_limit_warning_requeues_and_resumes(cluster, tmp_path):
    workdir, total = str(tmp_path), 768  # 12 iterations: long enough to be caught on the way
    job_id, log = _submit_resumable_ppo(cluster, workdir, total)
    # what SLURM does `--signal=B:USR1@120` before the time limit: USR1 to the batch shell (here: the script)
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    (job,) = cluster.wait_until_done(job_id, timeout=240)
    text = open(log).read()
    assert job["JobState"] == "COMPLETED", f"{job['JobState']}\n{text}"
    assert job["Restarts"] == "1", text
    run_dir = os.path.join(workdir, "runs", f"BreakoutNoFrameskip-v4__ppo_atari__1__slurm{job_id}")
    assert re.search(rf"USR1 received: checkpoint written; requeueing SLURM job {job_id}", text), text
    resumed = re.search(r"resuming (\S+) from global step (\d+)", text)
    assert resumed and resumed.group(1) == f"runs/{os.path.basename(run_dir)}", text
    assert 0 < int(resumed.group(2)) < total, text
    assert text.index("requeueing") < resumed.start() < text.index(f"step {total}/{total}"), text
    assert "restart 1:" in text, text  # slurm/run.sh's header line of the requeued run
    # one run directory, every iteration logged exactly once across the two processes
    assert os.listdir(os.path.join(workdir, "runs")) == [os.path.basename(run_dir)]
    assert len(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))) == 2
    assert _iteration_steps(run_dir) == list(range(64, total + 1, 64))


def test_scancel_stops_the_job_for_good(cluster, tmp_path):
    """`scancel <job>` sends TERM, as a preemption does: the run saves its resume file, but must not requeue the
    job the user just cancelled (SLURM requeues preempted jobs itself where the site preempts with REQUEUE)."""
    workdir = str(tmp_path)
    job_id, log = _submit_resumable_ppo(cluster, workdir, 2048)
    cluster.run("scancel", job_id)
    # the job shows CANCELLED once its processes have ended, after any `scontrol requeue` they made
    (job,) = cluster.wait_until_done(job_id, timeout=120)
    time.sleep(2)
    (job,) = cluster.job(job_id)
    text = open(log).read()
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "0", f"{job['JobState']}, {job['Restarts']}\n{text}"
    assert "restart 1:" not in text, text
    (run_dir,) = glob.glob(os.path.join(workdir, "runs", "*"))
    assert os.path.exists(os.path.join(run_dir, "resume.pt")), text  # resumable by hand with --run-name
