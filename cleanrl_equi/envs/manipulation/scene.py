"""Close-loop manipulation scenes in pybullet: the base env that the eight tasks of `tasks` share.

Written from scratch after BulletArm's close-loop tasks; no BulletArm code or assets are used. Every
object is built here from boxes and convex hulls, so the same shapes drive the physics and the image renderer.

Robot. A floating parallel-jaw gripper (a palm and two prismatic fingers, Panda-sized: fingers 1 cm thick, 2 cm
wide, 5 cm long, up to 8 cm apart) is driven by a fixed pybullet constraint whose target slides along the
commanded displacement over ~0.1 s of simulated time. There is no arm: BulletArm's arm only carried the gripper to
an IK target, and the tasks' semantics (friction grasps, pushing, dragging, hooking a drawer handle) live in the
fingers. Dropping the arm removes the IK solve and the joint-convergence loop, which is most of BulletArm's
0.03-0.08 s per step. With `robot="kuka"` or `"panda"` an arm beside the workspace carries this same gripper to the
same targets by inverse kinematics instead of the constraint (robots.py); the arm is not drawn in the observation.

Frames and units. World z is up and the table is the plane z = 0; lengths are metres, angles radians. The
workspace is the square [-s/2, s/2]^2 centred on the world origin (s = `workspace_size`, 0.3 by default as in
BulletArm) with gripper heights in [0.01, 0.25]. The *gripper position* is the midpoint between the fingertips,
so gripper z is the height of the fingertips above the table. The gripper starts every episode at (0, 0, 0.2),
yaw 0, open. At yaw 0 the fingers close along world y.

Action, a in [-1, 1]^5, = (p, dx, dy, dz, dtheta):
    p        gripper opening command, (a + 1) / 2 of the full 8 cm (0 = closed, 1 = open); a grasp squeezes with
             a bounded force, so closing on an object stops at the object.
    dx,dy,dz displacement of the gripper in the world frame, a * dpos (dpos = 0.05 m); the target is clipped to
             the workspace. Under a rotation R of the world about the vertical axis, (dx, dy) -> R (dx, dy).
    dtheta   change of the gripper yaw about world +z, a * drot (drot = pi/4 as in BulletArm). Invariant, like p
             and dz.
One env step moves the gripper to the target (physics runs, so it pushes and drags what it meets), then drives the
fingers to p, then reports. Actions outside [-1, 1] are clipped.

Observation, uint8 array of shape (2, H, W), H = W = `image_size` (128):
    channel 0  top-down orthographic height map, centred on the gripper and aligned with the world axes: row i
               samples world x = gripper_x + (i + 0.5 - H/2) * d, column j samples world y = gripper_y +
               (j + 0.5 - W/2) * d, with d = view_scale * workspace_size / H (0.45 m / 128 = 3.5 mm per pixel).
               So rows grow with +x, columns with +y, and the gripper axis passes through the image centre.
               Value = height of the highest surface above the table in millimetres (1 unit = 1 mm), rounded and
               clipped to [0, 255]; the table reads 0. The gripper body is not rendered; instead the two finger
               footprints are painted with the fingertips' height, so the image shows the gripper's yaw, its
               opening and its height (BulletArm reads the height off the camera instead).
               Block Pushing also paints its goal square as a 5 mm high patch (it has no physical body).
    channel 1  the holding flag, tiled: 255 when the gripper holds an object (both fingers touch it), else 0.
Rotation convention, pinned by tests: rotating the whole world by +90 degrees (counter-clockwise seen from
above) about the gripper's vertical axis turns channel 0 into `np.rot90(image, k=1)` (axes = (rows, cols)), and
(dx, dy) into (-dy, dx) = R (dx, dy) with R = [[0, -1], [1, 0]]. Under a batched image tensor this is
`torch.rot90(x, 1, dims=(-2, -1))`.

Rendering. Three renderers produce channel 0 (the `renderer` kwarg), with identical conventions:
    "analytic" (default)  ray-casts the known convex pieces in numpy: along the vertical line through a pixel
                          centre, a convex piece {n . p <= c} is the interval of z that satisfies every plane,
                          so its top is a min over the upward faces. Exact, and 5-15x faster than TinyRenderer.
    "tiny"                pybullet's CPU TinyRenderer, depth buffer of an orthographic camera; it matches the
                          analytic image pixel for pixel (tests/test_manipulation.py checks it).
    "raycast"             pybullet's rayTestBatch, one vertical ray per pixel; equal up to ~0.3% edge pixels,
                          and slow (the 16384 hits come back as Python tuples).
For "tiny" and "raycast" the gripper is moved out of view for the render and put back before the next physics step.
benchmarks/manipulation_speed.py measures all three.

Physics. pybullet DIRECT, 1/240 s steps, 50 solver iterations. A move takes 44 physics steps (the constraint
target follows a smoothstep over 0.15 s, then holds for 8 steps); a change of p adds 18 finger steps. A fresh
simulation is built at every reset, so an episode depends only on its seed (or its scene state).

Episodes. Reward 1 and `terminated=True` on the step the task succeeds; `terminated=True` with reward 0 when a
free object's centre leaves the workspace square; `truncated=True` after `max_steps` steps (50; gym.make's
`max_episode_steps` sets it too, see `adopt_time_limit`, and `env.spec.max_episode_steps` reports it).
`info["is_success"]` says whether the episode ended in success, `info["holding"]` mirrors channel 1; both are 0-d
numpy bool arrays at reset and at every step.

Smooth, gentle motion. `info` also holds the episode's smoothness and gentleness metrics so far (0-d float arrays;
definitions and units in metrics.py), sampled after every physics step unless `physics_metrics=False`. Optional
reward shaping (`action_rate_penalty`, `force_penalty` above `force_threshold` newtons) and compliance
(`gripper_force`, `finger_force`, the most force the gripper's positioning constraint and each finger apply) are
kwargs; their defaults leave the tasks as they were (reward 1 on success only, 150 N, 25 N). `action_filter_tau`
(seconds, 0 = off) makes the action a target move that the executed move follows through a first-order filter; the
filter's memory (the last executed move) is part of the scene state and turns with it.

Copies. `copy.deepcopy(env)` and `pickle` give an independent env with its own pybullet connection, rebuilt by
replaying the episode (its reset, then the same actions): it continues exactly like the original, in another
process too. A scene changed between steps by hand cannot be replayed, and such a copy is refused.

Expert. `env.unwrapped.expert_action()` returns the task planner's action for the current state, in the
normalised action space (each component clamped to dpos / drot). A vector env reaches it with
`envs.call("expert_action")` (a tuple, one action per env). Planners are deterministic waypoint followers that
read the current object poses, so they correct for slips and keep little memory. `expert_action(discrete=True)`
plans for an agent whose actions are whole steps (each of dx, dy, dz, dtheta in -1, 0, +1; p open or closed, as
the DQN's): the planner returns such actions, and it counts a waypoint as reached within half a step.

Scene state. `get_scene_state()` returns the scene as plain data (gripper pose and fingers, every task body's pose,
drawer joints, goal, planner memory), `reset(options={"scene_state": state})` rebuilds it exactly, and
`rotate_scene_state(state, quarter_turns)` turns it about the gripper's vertical axis: together they make the
symmetry test (and any scene edit a test wants) a few lines.
"""

from __future__ import annotations

import atexit
import copy
import ctypes
import dataclasses
import math
import os
import sys
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import EnvSpec, WrapperSpec
from scipy.spatial import ConvexHull

from cleanrl_equi.envs.manipulation.metrics import PhysicsMetrics, action_change, action_smoothness


def _import_pybullet_quietly():
    """pybullet's C code prints "pybullet build time: ..." to stderr when it is first imported: a stray line at the
    top of every run's log. Import it with file descriptors 1 and 2 pointed at /dev/null (C's buffers flushed before
    they are pointed back). A real import error still raises, with its message."""
    if "pybullet" in sys.modules:
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no such descriptors: nothing to keep clean
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        import pybullet  # noqa: F401

        ctypes.CDLL(None).fflush(None)
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


_import_pybullet_quietly()
import pybullet as pb  # noqa: E402
import pybullet_data  # noqa: E402
from pybullet_utils.bullet_client import BulletClient  # noqa: E402

from cleanrl_equi.envs.manipulation.robots import ROBOTS, Arm, make_arm  # noqa: E402

# ---- Fixed geometry and physics constants -----------------------------------------------------------------------
TIME_STEP = 1.0 / 240.0
Z_RANGE = (0.01, 0.25)  # gripper (fingertip) heights allowed, as BulletArm's workspace z range
START_HEIGHT = 0.2
HARD_RESET_EVERY = 100  # episodes an arm's simulation is kept (soft resets) before it is built anew
HEIGHT_UNIT = 0.001  # metres per uint8 level in channel 0
GOAL_MARK_HEIGHT = 0.005

FINGER_HALF = (0.01, 0.005, 0.025)  # half extents (along the jaw, across the jaw = closing axis, up)
FINGER_MAX = 0.04  # each finger's inner face travels 0..4 cm from the centre line: 8 cm max opening
PALM_HALF = (0.01, FINGER_MAX + 2 * FINGER_HALF[1] + 0.005, 0.01)
PALM_Z = 2 * FINGER_HALF[2] + PALM_HALF[2]  # palm sits on top of the fingers
FINGER_FORCE = 25.0  # N per finger: enough for a 40 N friction grip on a 0.1 kg cube, gentle on the scene
FINGER_SPEED = 0.5  # m/s
GRIPPER_FORCE = 150.0  # N, bounds how hard the gripper can push, press and pull
MOVE_SUBSTEPS = 36  # the constraint target slides 5 cm in 0.15 s (peak 0.5 m/s; a pushed block barely coasts) ...
SETTLE_SUBSTEPS = 8  # ... then holds still while the gripper closes the last tenths of a millimetre
FINGER_SUBSTEPS = 18  # fingers travel 4 cm at 0.5 m/s in 19 substeps, and a released object drops a little
CONTROL_PERIOD = (MOVE_SUBSTEPS + SETTLE_SUBSTEPS) * TIME_STEP  # s per move: the action filter's dt (finger time aside)

RENDERERS = ("analytic", "tiny", "raycast")
COLORS = {
    "red": (0.85, 0.25, 0.2, 1),
    "green": (0.3, 0.7, 0.3, 1),
    "blue": (0.25, 0.4, 0.85, 1),
    "yellow": (0.9, 0.75, 0.2, 1),
    "wood": (0.65, 0.5, 0.35, 1),
    "grey": (0.6, 0.6, 0.62, 1),
    "white": (0.9, 0.9, 0.9, 1),
    "gripper": (0.2, 0.2, 0.22, 1),
}


# ---- Connecting to pybullet without its stdout chatter -----------------------------------------------------------
try:
    _LIBC = ctypes.CDLL(None)  # the C library pybullet prints with (POSIX); without it, nothing to flush
except (OSError, TypeError):
    _LIBC = None


def _flush_c_stdout():
    if _LIBC is not None:
        _LIBC.fflush(None)


def connect_quietly() -> BulletClient:
    """A DIRECT pybullet client, disconnected at interpreter exit if nothing closed it before."""
    client = _connect_direct_quietly()
    _OPEN_CLIENTS.add(client)
    return client


@atexit.register
def _disconnect_open_clients():
    # A run stopped by a signal exits without closing its envs. BulletClient's __del__ would then disconnect during
    # interpreter teardown, when (Python 3.12) pybullet's module may be half gone, and print one "Exception ignored"
    # traceback per env. atexit runs while every module is still intact.
    for client in list(_OPEN_CLIENTS):
        if client._client >= 0:
            try:
                pb.disconnect(physicsClientId=client._client)
            except pb.error:
                pass
            client._client = -1


_OPEN_CLIENTS: "weakref.WeakSet[BulletClient]" = weakref.WeakSet()


def _connect_direct_quietly() -> BulletClient:
    """A DIRECT pybullet client. pybullet's C code prints `argv[0]=` to the process's stdout on every connect, which
    buried a training script's own output, so file descriptor 1 points at /dev/null for the connect only."""
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 at all: nothing to protect
        return BulletClient(connection_mode=pb.DIRECT)
    try:
        if sys.stdout is not None:
            sys.stdout.flush()  # what Python already buffered belongs to the real stdout, in order
        _flush_c_stdout()
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
        finally:
            os.close(devnull)
        try:
            return BulletClient(connection_mode=pb.DIRECT)
        finally:
            # When stdout is a pipe or a file, C stdio holds the line in its buffer: drop it into /dev/null before
            # fd 1 is back, or it would surface at the next flush. Another thread's print during these
            # microseconds is lost with it.
            _flush_c_stdout()
            os.dup2(saved, 1)
    finally:
        os.close(saved)


# ---- Small geometry helpers ---------------------------------------------------------------------------------------
def yaw_quaternion(yaw: float) -> tuple[float, float, float, float]:
    """Quaternion (x, y, z, w) of a rotation by `yaw` about world z."""
    return (0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2))


def quaternion_yaw(quaternion) -> float:
    """Yaw (rotation about z) of a quaternion (x, y, z, w); exact for upright bodies."""
    x, y, z, w = quaternion
    return math.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))


def wrap_angle(angle: float, period: float = 2 * math.pi) -> float:
    """`angle` moved by a multiple of `period` into [-period/2, period/2)."""
    return (angle + period / 2) % period - period / 2


def rotate_scene_state(state: dict, quarter_turns: int = 1) -> dict:
    """The scene state turned by quarter_turns * 90 degrees (counter-clockwise from above) about the gripper axis.

    Positions rotate about the gripper's vertical axis, every orientation (gripper yaw, body quaternions, the goal
    yaw) turns by the same angle, and joint values and planner memory are unchanged. Quarter turns keep the
    rotated pixel grid on the original one, so the rendered image rotates exactly (np.rot90).
    """
    angle = quarter_turns * math.pi / 2
    cos_a, sin_a = round(math.cos(angle)), round(math.sin(angle))  # exact 0/+-1 for quarter turns
    pivot = np.asarray(state["gripper"]["position"][:2], dtype=float)

    def turn_point(point):
        dx, dy = point[0] - pivot[0], point[1] - pivot[1]
        return [pivot[0] + cos_a * dx - sin_a * dy, pivot[1] + sin_a * dx + cos_a * dy, *point[2:]]

    turn = yaw_quaternion(angle)
    rotated = copy.deepcopy(state)
    rotated["gripper"]["yaw"] = wrap_angle(state["gripper"]["yaw"] + angle)
    if "motion" in state["gripper"]:  # the action filter's last executed move turns like an action's (dx, dy)
        mx, my, *rest = state["gripper"]["motion"]
        rotated["gripper"]["motion"] = [cos_a * mx - sin_a * my, sin_a * mx + cos_a * my, *rest]
    for body in rotated["bodies"]:
        body["position"] = turn_point(body["position"])
        body["orientation"] = list(pb.multiplyTransforms((0, 0, 0), turn, (0, 0, 0), body["orientation"])[1])
    if rotated.get("goal") is not None:
        rotated["goal"]["position"] = turn_point(rotated["goal"]["position"])
        rotated["goal"]["yaw"] = wrap_angle(rotated["goal"]["yaw"] + angle)
    return rotated


@dataclass
class Piece:
    """One convex piece of a body: a box (`half_extents`, placed at `position`/`yaw` in the body frame) or a hull.

    `vertices` and the half-spaces `normals . p <= offsets` (body frame) feed the analytic renderer.
    """

    half_extents: tuple | None = None
    position: tuple = (0.0, 0.0, 0.0)
    orientation: tuple = (0.0, 0.0, 0.0, 1.0)
    hull_vertices: np.ndarray | None = None
    vertices: np.ndarray = field(init=False)
    normals: np.ndarray = field(init=False)
    offsets: np.ndarray = field(init=False)

    def __post_init__(self):
        if self.half_extents is not None:
            hx, hy, hz = self.half_extents
            corners = np.array([[sx * hx, sy * hy, sz * hz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
            rotation = np.array(pb.getMatrixFromQuaternion(self.orientation)).reshape(3, 3)
            self.vertices = corners @ rotation.T + np.asarray(self.position)
            axes = rotation.T  # rows: the box axes in the body frame
            self.normals = np.concatenate([axes, -axes])
            half = np.array([hx, hy, hz, hx, hy, hz])
            self.offsets = self.normals @ np.asarray(self.position) + half
        else:
            self.vertices = np.asarray(self.hull_vertices, dtype=float)
            hull = ConvexHull(self.vertices)
            equations = np.unique(np.round(hull.equations, 9), axis=0)  # one row per face, not per triangle
            self.normals, self.offsets = equations[:, :3], -equations[:, 3]


def box(half_extents, position=(0.0, 0.0, 0.0), yaw: float = 0.0, orientation=None) -> Piece:
    """A box piece; `orientation` (a quaternion) overrides `yaw` for tilted boxes."""
    return Piece(half_extents=tuple(half_extents), position=tuple(position),
                 orientation=tuple(orientation) if orientation is not None else yaw_quaternion(yaw))


# ---- The base env ------------------------------------------------------------------------------------------------
class ManipulationEnv(gym.Env):
    """A floating gripper above a table with task objects; subclasses add objects, success checks and planners.

    Subclass contract: `_create_task_bodies()` creates the bodies (any pose), `_sample_scene()` places them with
    `self.np_random` and fills `self.planner_memory`, `_is_success()` and `planner_action()` read the scene.
    `self.free_objects` lists the bodies that must stay in the workspace and can be held.
    """

    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None, workspace_size: float = 0.3, image_size: int = 128,
                 view_scale: float = 1.5, dpos: float = 0.05, drot: float = math.pi / 4, max_steps: int = 50,
                 renderer: str = "analytic", render_size: int = 256, physics_metrics: bool = True,
                 gripper_force: float = GRIPPER_FORCE, finger_force: float = FINGER_FORCE,
                 action_rate_penalty: float = 0.0, force_penalty: float = 0.0, force_threshold: float = 20.0,
                 action_filter_tau: float = 0.0, robot: str = "floating"):
        name = type(self).__name__
        if robot not in ROBOTS:
            raise ValueError(f"{name}: robot must be one of {ROBOTS}, got {robot!r}.")
        if robot != "floating" and renderer != "analytic":
            raise ValueError(f"{name}: the {renderer!r} renderer would draw the arm's links into the height map; "
                             f"an arm ({robot!r}) runs with the analytic renderer, which draws the fingers only.")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"{name}: render_mode must be None or 'rgb_array', got {render_mode!r}.")
        if not (isinstance(workspace_size, (int, float)) and 0.25 <= workspace_size <= 0.6):
            raise ValueError(f"{name}: workspace_size must be a number of metres in [0.25, 0.6] (the tasks' objects "
                             f"need room), got {workspace_size!r}.")
        if not (isinstance(image_size, int) and 16 <= image_size <= 1024):
            raise ValueError(f"{name}: image_size must be an integer number of pixels in [16, 1024], got {image_size!r}.")
        if not (isinstance(view_scale, (int, float)) and 1.0 <= view_scale <= 3.0):
            raise ValueError(f"{name}: view_scale (image width / workspace width) must be in [1, 3], got {view_scale!r}.")
        if not (isinstance(dpos, (int, float)) and 0.005 <= dpos <= 0.1):
            raise ValueError(f"{name}: dpos (metres per unit action) must be in [0.005, 0.1], got {dpos!r}.")
        if not (isinstance(drot, (int, float)) and 0.01 <= drot <= math.pi / 2):
            raise ValueError(f"{name}: drot (radians per unit action) must be in [0.01, pi/2], got {drot!r}.")
        if not (isinstance(max_steps, int) and max_steps >= 1):
            raise ValueError(f"{name}: max_steps must be a positive integer, got {max_steps!r}.")
        if not (isinstance(render_size, int) and 16 <= render_size <= 2048):
            raise ValueError(f"{name}: render_size (rgb frame width in pixels) must be an integer in [16, 2048], "
                             f"got {render_size!r}.")
        if renderer not in RENDERERS:
            raise ValueError(f"{name}: renderer must be one of {RENDERERS}, got {renderer!r}.")
        for key, value, low, high in (("gripper_force", gripper_force, 1.0, 1000.0),
                                      ("finger_force", finger_force, 1.0, 200.0),
                                      ("action_rate_penalty", action_rate_penalty, 0.0, 100.0),
                                      ("force_penalty", force_penalty, 0.0, 100.0),
                                      ("force_threshold", force_threshold, 0.1, 1000.0),
                                      ("action_filter_tau", action_filter_tau, 0.0, 2.0)):
            if not (isinstance(value, (int, float)) and low <= value <= high):
                raise ValueError(f"{name}: {key} must be a number in [{low:g}, {high:g}], got {value!r}.")
        self.render_mode = render_mode
        self.workspace_size = float(workspace_size)
        self.image_size = image_size
        self.view_scale = float(view_scale)
        self.dpos = float(dpos)
        self.drot = float(drot)
        self.max_steps = max_steps
        self.renderer = renderer
        self.render_size = render_size
        self.robot = robot  # what carries the gripper (robots.py); the arm itself is rebuilt with every simulation
        self.arm: Arm | None = None
        # Smooth, gentle motion: the metrics (metrics.py), the gripper's compliance and the optional reward shaping.
        # The penalty reads the contact forces, so it samples them even with physics_metrics off.
        self.physics_metrics = bool(physics_metrics) or force_penalty > 0
        self.gripper_force = float(gripper_force)
        self.finger_force = float(finger_force)
        self.action_rate_penalty = float(action_rate_penalty)
        self.force_penalty = float(force_penalty)
        self.force_threshold = float(force_threshold)
        # The action filter (off at tau 0): the executed move (dx, dy, dz in m, dyaw in rad) approaches the commanded
        # one by this gain per move, a first-order low-pass of time constant tau sampled every CONTROL_PERIOD.
        self.action_filter_tau = float(action_filter_tau)
        self.action_filter_gain = 1.0 - math.exp(-CONTROL_PERIOD / self.action_filter_tau) if action_filter_tau else 1.0
        self.executed_motion = np.zeros(4)
        self.metrics: PhysicsMetrics | None = None
        self.pixel_size = self.view_scale * self.workspace_size / image_size
        half = self.workspace_size / 2
        self.workspace = np.array([[-half, half], [-half, half], list(Z_RANGE)])
        self.observation_space = gym.spaces.Box(0, 255, (2, image_size, image_size), np.uint8)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (5,), np.float32)
        self.sim: BulletClient | None = None
        self._soft_resets_left = 0
        self.planner_memory: dict = {}
        self.goal: dict | None = None
        self.steps = 0
        self._record: dict | None = None  # the episode so far, as reset() and step() received it

    # ---- the spec gym.make records, with the episode limit in effect ----
    @property
    def spec(self) -> EnvSpec | None:
        """`max_episode_steps` and the `max_steps` kwarg both report `self.max_steps`, and once `adopt_time_limit`
        has seen the env the spec names it, so `gym.make(env.spec)` (Minari's `recover_environment`, for one)
        rebuilds an env with the same limit and no TimeLimit on top."""
        spec = self.__dict__.get("_spec")
        if spec is None:
            return None
        wrappers = spec.additional_wrappers
        if self.__dict__.get("_time_limit_adopted") and ADOPT_TIME_LIMIT not in wrappers:
            wrappers = (ADOPT_TIME_LIMIT, *wrappers)
        return dataclasses.replace(spec, max_episode_steps=self.max_steps, additional_wrappers=wrappers,
                                   kwargs={**spec.kwargs, "max_steps": self.max_steps})

    @spec.setter
    def spec(self, spec: EnvSpec | None):
        self._spec = spec

    # ---- scene construction ----
    def _build_world(self):
        """Fresh simulation with table, gripper and the task's bodies (resetSimulation keeps episodes identical
        under a seed: no contact caches or body ids survive from the previous episode). With an arm, whose model
        takes 15-20 ms to load, the simulation is kept between episodes as BulletArm does (a soft reset: only the
        task's bodies are removed and made again, the arm and gripper are put back at rest), rebuilt every
        HARD_RESET_EVERY episodes; an episode is the same either way (tests/test_arms.py compares them)."""
        if self.arm is not None and self.sim is not None and 0 < self._soft_resets_left:
            self._soft_resets_left -= 1
            self._remove_task_bodies()
            self._set_gripper(np.array([0.0, 0.0, START_HEIGHT]), 0.0, (FINGER_MAX, FINGER_MAX), 1.0)
            self.sim.performCollisionDetection()  # drops the contact caches of the gripper's last touches
            self._create_task_bodies()
            return
        if self.sim is None:
            self.sim = connect_quietly()
            self.sim.setAdditionalSearchPath(pybullet_data.getDataPath())
        sim = self.sim
        self._soft_resets_left = HARD_RESET_EVERY
        sim.resetSimulation()
        sim.setTimeStep(TIME_STEP)
        sim.setGravity(0, 0, -9.8)
        sim.setPhysicsEngineParameter(numSolverIterations=50, deterministicOverlappingPairs=1)
        self.table = sim.loadURDF("plane.urdf")
        self._render_parts: list[tuple[int, int, list[Piece]]] = []
        self.bodies: list[int] = []  # task bodies, in creation order (the order of the scene state)
        self.free_objects: list[int] = []
        self.articulated: list[int] = []  # task bodies with one prismatic joint (the drawer)
        self.goal = None
        self._create_gripper()
        if self.arm is not None:
            sim.performCollisionDetection()  # as a soft reset does at this point, so both start alike
        self._create_task_bodies()

    def _remove_task_bodies(self):
        """Remove every body made after the gripper and arm (task bodies, goal marker), newest first, so that
        pybullet hands out their ids again in the same order."""
        sim = self.sim
        keep = {self.table, self.gripper, self.arm.body}
        for index in reversed(range(sim.getNumBodies())):
            body = sim.getBodyUniqueId(index)
            if body not in keep:
                sim.removeBody(body)
        self._render_parts = []
        self.bodies, self.free_objects, self.articulated = [], [], []
        self.goal = None

    def _create_gripper(self):
        sim = self.sim
        palm_shape = sim.createCollisionShape(pb.GEOM_BOX, halfExtents=PALM_HALF, collisionFramePosition=(0, 0, PALM_Z))
        palm_visual = sim.createVisualShape(pb.GEOM_BOX, halfExtents=PALM_HALF, visualFramePosition=(0, 0, PALM_Z),
                                            rgbaColor=COLORS["gripper"])
        finger_shape = sim.createCollisionShape(pb.GEOM_BOX, halfExtents=FINGER_HALF)
        finger_visual = sim.createVisualShape(pb.GEOM_BOX, halfExtents=FINGER_HALF, rgbaColor=COLORS["gripper"])
        # Finger link frames sit at the finger centres; joint value q puts the inner faces at +-q.
        self.gripper = sim.createMultiBody(
            baseMass=0.5, baseCollisionShapeIndex=palm_shape, baseVisualShapeIndex=palm_visual,
            basePosition=(0, 0, START_HEIGHT),
            linkMasses=[0.05, 0.05], linkCollisionShapeIndices=[finger_shape] * 2,
            linkVisualShapeIndices=[finger_visual] * 2,
            linkPositions=[(0, FINGER_HALF[1], FINGER_HALF[2]), (0, -FINGER_HALF[1], FINGER_HALF[2])],
            linkOrientations=[(0, 0, 0, 1)] * 2, linkInertialFramePositions=[(0, 0, 0)] * 2,
            linkInertialFrameOrientations=[(0, 0, 0, 1)] * 2, linkParentIndices=[0, 0],
            linkJointTypes=[pb.JOINT_PRISMATIC] * 2, linkJointAxis=[(0, 1, 0), (0, -1, 0)])
        for link in (0, 1):
            sim.changeDynamics(self.gripper, link, lateralFriction=1.0, spinningFriction=0.002)
        # Couple the fingers like a real parallel gripper: without it a held object swings both fingers sideways
        # when the gripper accelerates along the closing axis.
        coupling = sim.createConstraint(self.gripper, 0, self.gripper, 1, pb.JOINT_GEAR, (0, 1, 0), (0, 0, 0), (0, 0, 0))
        sim.changeConstraint(coupling, gearRatio=-1, erp=0.2, maxForce=100)
        self.arm = make_arm(sim, self.robot, self.gripper)
        if self.arm is not None:  # the gripper rides on the arm's flange instead of a world-fixed constraint
            self.gripper_constraint = self.arm.attachment
        else:
            self.gripper_constraint = sim.createConstraint(self.gripper, -1, -1, -1, pb.JOINT_FIXED, (0, 0, 0),
                                                           (0, 0, 0), (0, 0, START_HEIGHT))
        self._set_gripper(np.array([0.0, 0.0, START_HEIGHT]), 0.0, (FINGER_MAX, FINGER_MAX), 1.0)

    def _set_gripper(self, position, yaw, finger_positions, command):
        """Put the gripper (and its constraint target and finger motors) exactly at a pose, at rest."""
        sim = self.sim
        sim.resetBasePositionAndOrientation(self.gripper, position, yaw_quaternion(yaw))
        sim.resetBaseVelocity(self.gripper, (0, 0, 0), (0, 0, 0))
        if self.arm is not None:
            self.arm.place(position, yaw)
        else:
            sim.changeConstraint(self.gripper_constraint, jointChildPivot=position,
                                 jointChildFrameOrientation=yaw_quaternion(yaw), maxForce=self.gripper_force)
        for link, q in zip((0, 1), finger_positions):
            sim.resetJointState(self.gripper, link, q, 0.0)
        self.gripper_command = float(command)
        self._drive_fingers()

    def _drive_fingers(self):
        target = self.gripper_command * FINGER_MAX
        for link in (0, 1):
            self.sim.setJointMotorControl2(self.gripper, link, pb.POSITION_CONTROL, targetPosition=target,
                                           force=self.finger_force, maxVelocity=FINGER_SPEED)

    def add_body(self, pieces: list[Piece], mass: float, color: str, friction: float = 1.0, free: bool = True) -> int:
        """Create a rigid body from convex pieces (mass 0 = static) and register it for rendering."""
        sim = self.sim
        if len(pieces) == 1 and pieces[0].half_extents is None:  # a single hull: mesh collision and visual shapes
            vertices = pieces[0].vertices
            shape = sim.createCollisionShape(pb.GEOM_MESH, vertices=vertices.tolist())
            visual = sim.createVisualShape(pb.GEOM_MESH, vertices=vertices.tolist(),
                                           indices=_outward_triangles(vertices), rgbaColor=COLORS[color])
        else:
            shape, visual = self._box_shapes(pieces, color)
        body = sim.createMultiBody(baseMass=mass, baseCollisionShapeIndex=shape, baseVisualShapeIndex=visual)
        sim.changeVisualShape(body, -1, rgbaColor=COLORS[color])
        sim.changeDynamics(body, -1, lateralFriction=friction)
        if mass > 0:
            sim.changeDynamics(body, -1, linearDamping=0.04, angularDamping=0.04)
        self._render_parts.append((body, -1, pieces))
        self.bodies.append(body)
        if free:
            self.free_objects.append(body)
        return body

    def _box_shapes(self, pieces: list[Piece], color: str) -> tuple[int, int]:
        kwargs = {"halfExtents": [p.half_extents for p in pieces]}
        shape = self.sim.createCollisionShapeArray(
            [pb.GEOM_BOX] * len(pieces), **kwargs, collisionFramePositions=[p.position for p in pieces],
            collisionFrameOrientations=[p.orientation for p in pieces])
        visual = self.sim.createVisualShapeArray(
            [pb.GEOM_BOX] * len(pieces), **kwargs, visualFramePositions=[p.position for p in pieces],
            visualFrameOrientations=[p.orientation for p in pieces])
        return shape, visual

    def add_sliding_body(self, base_pieces: list[Piece], link_pieces: list[Piece], travel: float,
                         base_color: str, link_color: str) -> int:
        """A static body with one part sliding along the body's +x axis over [0, travel] (a drawer)."""
        sim = self.sim
        base_shape, base_visual = self._box_shapes(base_pieces, base_color)
        link_shape, link_visual = self._box_shapes(link_pieces, link_color)
        body = sim.createMultiBody(
            baseMass=0, baseCollisionShapeIndex=base_shape, baseVisualShapeIndex=base_visual,
            linkMasses=[0.3], linkCollisionShapeIndices=[link_shape], linkVisualShapeIndices=[link_visual],
            linkPositions=[(0, 0, 0)], linkOrientations=[(0, 0, 0, 1)], linkInertialFramePositions=[(0, 0, 0)],
            linkInertialFrameOrientations=[(0, 0, 0, 1)], linkParentIndices=[0],
            linkJointTypes=[pb.JOINT_PRISMATIC], linkJointAxis=[(1, 0, 0)])
        # A weak velocity motor acts as sliding friction, so a pulled drawer stops when the pull stops.
        sim.changeDynamics(body, 0, jointLowerLimit=0.0, jointUpperLimit=travel, lateralFriction=1.0)
        sim.setJointMotorControl2(body, 0, pb.VELOCITY_CONTROL, targetVelocity=0, force=2.0)
        for visual_index, color in ((-1, base_color), (0, link_color)):
            sim.changeVisualShape(body, visual_index, rgbaColor=COLORS[color])
        self._render_parts += [(body, -1, base_pieces), (body, 0, link_pieces)]
        self.bodies.append(body)
        self.articulated.append(body)
        return body

    def set_body_pose(self, body: int, position, yaw: float = 0.0, orientation=None):
        quaternion = orientation if orientation is not None else yaw_quaternion(yaw)
        self.sim.resetBasePositionAndOrientation(body, position, quaternion)
        self.sim.resetBaseVelocity(body, (0, 0, 0), (0, 0, 0))

    def set_goal(self, goal: dict | None):
        """Set the goal square ({"position": [x, y], "yaw": ..., "size": ...}); a flat, collision-free marker
        shows it in rgb renders, and the observation paints it."""
        self.goal = goal
        if goal is not None:
            half = goal["size"] / 2
            marker = self.sim.createVisualShape(pb.GEOM_BOX, halfExtents=(half, half, 0.0005),
                                                rgbaColor=(0.2, 0.6, 0.95, 1))
            self.sim.createMultiBody(baseMass=0, baseVisualShapeIndex=marker,
                                     basePosition=(*goal["position"][:2], 0.0005),
                                     baseOrientation=yaw_quaternion(goal["yaw"]))

    # ---- subclass hooks ----
    def _create_task_bodies(self):
        raise NotImplementedError

    def _sample_scene(self):
        raise NotImplementedError

    def _is_success(self) -> bool:
        raise NotImplementedError

    def expert_action(self, discrete: bool = False) -> np.ndarray:
        """The planner's action for the current state, in the normalised action space [-1, 1]^5. `discrete`: plan
        for whole-step actions (dx, dy, dz, dtheta in -1, 0, +1; p -1 or +1), the grid a discrete agent rounds to."""
        self.planning_discrete = bool(discrete)
        try:
            return self.planner_action()
        finally:
            self.planning_discrete = False

    def planner_action(self) -> np.ndarray:
        """The task's planner (`expert_action` sets `self.planning_discrete` around the call)."""
        raise NotImplementedError

    # ---- gymnasium API ----
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        scene_state = options.get("scene_state") if options else None
        # All a copy needs to rebuild this episode exactly (see __getstate__): how it began, then every action.
        self._record = {"scene_state": copy.deepcopy(scene_state), "actions": [],
                        "rng": None if scene_state is not None else self.np_random.bit_generator.state}
        self._start_episode(scene_state)
        return self._observation(), self._info(False)

    def _start_episode(self, scene_state: dict | None):
        self._build_world()
        self.steps = 0
        self.planner_memory = {}
        self.executed_motion = np.zeros(4)  # each episode starts at rest
        if scene_state is not None:
            self.set_scene_state(scene_state)
        else:
            self._sample_scene()
            self.sim.performCollisionDetection()
        self.holding = self._held_object() is not None
        self.metrics = None
        if self.physics_metrics:
            self.metrics = PhysicsMetrics(self.sim._client, self.gripper, self.bodies, self.free_objects, self.articulated,
                                          TIME_STEP, arm=self.arm)

    def step(self, action):
        if self.sim is None:
            raise RuntimeError("call reset() before step().")
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(5), -1.0, 1.0)
        actions = self._record["actions"]
        previous_action = actions[-1] if actions else None
        actions.append(action)
        if self.metrics is not None:
            self.metrics.start_step()
        position, yaw = self.gripper_pose()
        if self.action_filter_tau > 0:
            # The action is a target move that a first-order filter follows, as a real arm's velocity controller
            # does: the executed move changes by at most the gain times the command's distance from the last one,
            # so velocity changes between moves stay bounded (bounded jerk) whatever the policy commands. Linear,
            # so it commutes with any rotation of (dx, dy). The state is the move really executed (after the
            # workspace clip): a gripper stopped by the floor starts its next move from rest.
            commanded = np.array([*(action[1:4] * self.dpos), action[4] * self.drot])
            motion = self.executed_motion + self.action_filter_gain * (commanded - self.executed_motion)
            target = np.clip(position + motion[:3], self.workspace[:, 0], self.workspace[:, 1])
            self.executed_motion = np.array([*(target - position), motion[3]])
            self._move_gripper(position, yaw, target, yaw + motion[3])
        else:
            target = position + action[1:4] * self.dpos
            target = np.clip(target, self.workspace[:, 0], self.workspace[:, 1])
            self._move_gripper(position, yaw, target, yaw + action[4] * self.drot)
        command = (action[0] + 1) / 2
        if abs(command - self.gripper_command) > 1e-6:  # unchanged fingers hold their grip: nothing to simulate
            self.gripper_command = float(command)
            self._drive_fingers()
            for _ in range(FINGER_SUBSTEPS):
                self._physics_step()
        self.steps += 1
        self.holding = self._held_object() is not None
        success = bool(self._is_success())
        left_workspace = not success and self._object_left_workspace()
        terminated = success or left_workspace
        truncated = not terminated and self.steps >= self.max_steps
        reward = float(success)
        # Optional shaping toward smooth, gentle motion (off by default): a penalty on the change of the normalised
        # action (an action-rate cost, as in legged-robot RL), and one on the gripper's contact force above a
        # threshold, in units of the threshold (a force-limit cost, as in safe and contact-rich RL).
        if self.action_rate_penalty > 0 and previous_action is not None:
            change = action - previous_action
            reward -= self.action_rate_penalty * float(change @ change)
        if self.force_penalty > 0:
            excess = max(0.0, self.metrics.step_peak_grip_force - self.force_threshold)
            reward -= self.force_penalty * excess / self.force_threshold
        return self._observation(), reward, terminated, truncated, self._info(success)

    def _info(self, success: bool) -> dict:
        # 0-d arrays, at reset and at every step: TorchRL's default info reader needs a `.dtype` (a Python bool
        # has none), gymnasium's vector envs stack them into a bool array (an np.bool_ would make an object array),
        # and Minari's DataCollector wants the reset's types on every step. The metrics are the episode's so far.
        info = {"is_success": np.array(success), "holding": np.array(self.holding)}
        actions = np.asarray(self._record["actions"] if self._record else [], dtype=np.float64)  # converted once
        info["action_smoothness"] = np.array(action_smoothness(actions))
        info["action_change"] = np.array(action_change(actions))
        if self.metrics is not None:
            info.update({key: np.array(value) for key, value in self.metrics.values().items()})
        return info

    def _physics_step(self):
        self.sim.stepSimulation()
        if self.metrics is not None:
            self.metrics.sample()

    def _move_gripper(self, start, start_yaw, target, target_yaw):
        """Slide the constraint target from the current pose to the target, then hold it while the gripper settles."""
        if self.arm is not None:  # the arm's joints follow the same smoothstep and settle as long (robots.py)
            self.arm.move(target, target_yaw, MOVE_SUBSTEPS, SETTLE_SUBSTEPS, TIME_STEP, self._physics_step)
            return
        change_constraint, step_simulation = self.sim.changeConstraint, self.sim.stepSimulation  # hot loop
        sample = self.metrics.sample if self.metrics is not None else None
        force = self.gripper_force
        for i in range(1, MOVE_SUBSTEPS + SETTLE_SUBSTEPS + 1):
            progress = min(1.0, i / MOVE_SUBSTEPS)
            fraction = progress * progress * (3 - 2 * progress)  # smoothstep: no velocity jump at either end
            change_constraint(self.gripper_constraint, jointChildPivot=start + fraction * (target - start),
                              jointChildFrameOrientation=yaw_quaternion(start_yaw + fraction * (target_yaw - start_yaw)),
                              maxForce=force)
            step_simulation()
            if sample is not None:
                sample()

    def render(self):
        if self.render_mode != "rgb_array" or self.sim is None:
            return None
        # Seen from above the +x edge of the workspace, tilted: up in the frame is -x and right is +y, the same
        # layout as the observation image (rows = +x, columns = +y).
        size, scale = self.render_size, self.workspace_size / 0.3
        view = self.sim.computeViewMatrix((0.3 * scale, 0.0, 0.55 * scale), (0.0, 0.0, 0.0), (-1.0, 0.0, 0.5))
        projection = self.sim.computeProjectionMatrixFOV(45, 1.0, 0.05, 5.0)
        _, _, rgba, _, _ = self.sim.getCameraImage(size, size, view, projection, renderer=pb.ER_TINY_RENDERER,
                                                   lightDirection=(0.3, 0.5, 1.0), shadow=1)
        return np.asarray(rgba, dtype=np.uint8).reshape(size, size, 4)[:, :, :3].copy()

    def close(self):
        if self.sim is not None:
            self.sim.disconnect()
            self.sim = None

    # ---- state readers ----
    def gripper_pose(self) -> tuple[np.ndarray, float]:
        position, orientation = self.sim.getBasePositionAndOrientation(self.gripper)
        return np.array(position), quaternion_yaw(orientation)

    def finger_positions(self) -> tuple[float, float]:
        return tuple(state[0] for state in self.sim.getJointStates(self.gripper, [0, 1]))

    def body_pose(self, body: int, link: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """Position and quaternion of a body (or one of its links)."""
        if link == -1:
            position, orientation = self.sim.getBasePositionAndOrientation(body)
        else:
            position, orientation = self.sim.getLinkState(body, link, computeForwardKinematics=1)[4:6]
        return np.array(position), np.array(orientation)

    def body_yaw(self, body: int) -> float:
        return quaternion_yaw(self.sim.getBasePositionAndOrientation(body)[1])

    def upright_cosine(self, body: int) -> float:
        """World-z component of the body's z axis (1 = upright)."""
        return float(np.array(self.sim.getMatrixFromQuaternion(self.sim.getBasePositionAndOrientation(body)[1]))[8])

    def touching(self, body_a: int, body_b: int) -> bool:
        """In contact: pybullet also reports points up to ~2 cm apart, so require a gap under 2 mm."""
        return any(contact[8] < 0.002 for contact in self.sim.getContactPoints(body_a, body_b))

    def _held_object(self) -> int | None:
        """The free object both fingers touch with roughly horizontal contact normals, if any."""
        for body in self.free_objects:
            touched = set()
            for contact in self.sim.getContactPoints(self.gripper, body):
                if contact[3] in (0, 1) and abs(contact[7][2]) < 0.5:
                    touched.add(contact[3])
            if len(touched) == 2:
                return body
        return None

    def is_held(self, body: int) -> bool:
        return self.holding and self._held_object() == body

    def _object_left_workspace(self) -> bool:
        for body in self.free_objects:
            x, y, _ = self.sim.getBasePositionAndOrientation(body)[0]
            if not (self.workspace[0, 0] <= x <= self.workspace[0, 1] and self.workspace[1, 0] <= y <= self.workspace[1, 1]):
                return True
        return False

    # ---- scene state (plain data) ----
    def get_scene_state(self) -> dict:
        position, yaw = self.gripper_pose()
        bodies = []
        for body in self.bodies:
            body_position, orientation = self.body_pose(body)
            entry = {"position": body_position.tolist(), "orientation": orientation.tolist()}
            if body in self.articulated:
                entry["joint"] = self.sim.getJointState(body, 0)[0]
            bodies.append(entry)
        gripper = {"position": position.tolist(), "yaw": yaw, "fingers": list(self.finger_positions()),
                   "command": self.gripper_command}
        if self.action_filter_tau > 0:  # the filter's memory: without it a restored scene would start at rest
            gripper["motion"] = self.executed_motion.tolist()
        return {
            "gripper": gripper,
            "bodies": bodies,
            "goal": copy.deepcopy(self.goal),
            "planner_memory": copy.deepcopy(self.planner_memory),
            "steps": self.steps,
        }

    def set_scene_state(self, state: dict):
        """Place the gripper and every task body as `state` says, at rest (called by reset with a scene_state)."""
        if len(state["bodies"]) != len(self.bodies):
            raise ValueError(f"{type(self).__name__}: the scene state has {len(state['bodies'])} bodies, this task "
                             f"has {len(self.bodies)}; pass a state from get_scene_state() of the same task.")
        gripper = state["gripper"]
        self._set_gripper(np.asarray(gripper["position"], dtype=float), gripper["yaw"], gripper["fingers"],
                          gripper["command"])
        self.executed_motion = np.array(gripper.get("motion", np.zeros(4)), dtype=float)
        for body, entry in zip(self.bodies, state["bodies"]):
            self.set_body_pose(body, entry["position"], orientation=entry["orientation"])
            if "joint" in entry:
                self.sim.resetJointState(body, 0, entry["joint"], 0.0)
        self.set_goal(copy.deepcopy(state.get("goal")))
        self.planner_memory = copy.deepcopy(state.get("planner_memory", {}))
        self.steps = int(state.get("steps", 0))
        self.sim.performCollisionDetection()  # contacts (the holding flag) without moving anything

    # ---- copies: deepcopy and pickle ----
    def __getstate__(self):
        """Everything but the pybullet connection. A copy rebuilds its own simulation by replaying the episode
        (`reset` from the recorded seed state or scene state, then the same actions): a scene state alone restores
        poses at rest, and pybullet cannot move velocities and contact caches (warm starts, including the
        per-piece ones of compound bodies such as the bowl) into another connection exactly."""
        state = self.__dict__.copy()
        state["sim"] = None
        if self.sim is not None:
            if self._record is None:
                raise RuntimeError(f"{type(self).__name__}: this simulation was not started by reset(), so a copy "
                                   f"cannot rebuild it; call reset() first.")
            state["_replay_check"] = self._physics_record()
        return state

    def __setstate__(self, state: dict):
        check = state.pop("_replay_check", None)
        self.__dict__.update(state)
        if check is not None:
            self._replay(check)

    def _replay(self, check: tuple):
        record, rng, planner_memory = self._record, self._np_random, self.planner_memory
        if record["rng"] is not None:
            self._np_random = np.random.Generator(getattr(np.random, record["rng"]["bit_generator"])())
            self._np_random.bit_generator.state = record["rng"]
        self._record = {**record, "actions": []}
        try:
            self._start_episode(record["scene_state"])
        finally:
            self._np_random = rng  # the original's generator as it is now, not as it was at reset
        # The same calls as the original, observations included: the tiny and raycast renderers move the gripper
        # out of view and back, which a replay must repeat to stay exact.
        self._observation()
        for action in record["actions"]:
            self.step(action)
        self.planner_memory = planner_memory
        if self._physics_record() != check:
            steps = len(record["actions"])
            self.close()
            raise RuntimeError(
                f"{type(self).__name__}: this env cannot be copied or unpickled exactly: replaying its episode "
                f"(reset and {steps} steps) does not reproduce its scene, so the scene was changed outside reset() "
                f"and step() (or pybullet differs between the two processes), and pybullet cannot carry velocities "
                f"and contact caches to a new connection; copy it before such a change, or start a new env with "
                f"reset(options={{'scene_state': env.unwrapped.get_scene_state()}}) (poses at rest).")

    def _physics_record(self) -> tuple:
        """Every simulated number a copy must reproduce: poses, velocities and joint states of the gripper and of
        every task body, the gripper's constraint target, and the episode's counters."""
        sim, numbers = self.sim, [self.steps, self.gripper_command, self.holding, self.goal]
        if self.action_filter_tau > 0:
            numbers.append(tuple(self.executed_motion))
        for body in (self.gripper, *self.bodies):
            numbers += [*sim.getBasePositionAndOrientation(body), *sim.getBaseVelocity(body)]
            numbers += [sim.getJointState(body, joint)[:2] for joint in range(sim.getNumJoints(body))]
        constraint = sim.getConstraintInfo(self.gripper_constraint)
        if self.arm is not None:
            numbers += self.arm.record()
        return (*numbers, constraint[7], constraint[9])

    # ---- observation ----
    def _observation(self) -> np.ndarray:
        position, _ = self.gripper_pose()
        if self.renderer == "analytic":
            heights = self._analytic_heightmap(position[:2])
        else:
            heights = self._pybullet_heightmap(position[:2], position)
        self._paint_goal(heights, position[:2])
        self._paint_fingers(heights, position[:2])
        image = np.empty(self.observation_space.shape, dtype=np.uint8)
        image[0] = np.clip(np.rint(heights / HEIGHT_UNIT), 0, 255)
        image[1] = 255 if self.holding else 0
        return image

    def _pixel_centres(self, centre_xy):
        """World x of each row's and world y of each column's pixel centre."""
        offsets = (np.arange(self.image_size) + 0.5 - self.image_size / 2) * self.pixel_size
        return centre_xy[0] + offsets, centre_xy[1] + offsets

    def _pixel_window(self, centres, low, high):
        """Index range [first, last) of pixel centres inside [low, high]."""
        start = centres[0] - 0.5 * self.pixel_size
        first = max(0, math.ceil((low - start) / self.pixel_size - 0.5))
        last = min(self.image_size, math.floor((high - start) / self.pixel_size - 0.5) + 1)
        return first, last

    def _analytic_heightmap(self, centre_xy) -> np.ndarray:
        rows_x, cols_y = self._pixel_centres(centre_xy)
        heights = np.zeros((self.image_size, self.image_size))
        for body, link, pieces in self._render_parts:
            position, orientation = self.body_pose(body, link)
            rotation = np.array(pb.getMatrixFromQuaternion(orientation)).reshape(3, 3)
            for piece in pieces:
                vertices = piece.vertices @ rotation.T + position
                r0, r1 = self._pixel_window(rows_x, vertices[:, 0].min(), vertices[:, 0].max())
                c0, c1 = self._pixel_window(cols_y, vertices[:, 1].min(), vertices[:, 1].max())
                if r0 >= r1 or c0 >= c1:
                    continue
                normals = piece.normals @ rotation.T
                offsets = piece.offsets + normals @ position
                # Along the vertical line through (x, y): n_z * z <= c - n_x x - n_y y for every face.
                rhs = (offsets[:, None, None] - normals[:, 0, None, None] * rows_x[None, r0:r1, None]
                       - normals[:, 1, None, None] * cols_y[None, None, c0:c1])
                nz = normals[:, 2]
                up, down = nz > 1e-9, nz < -1e-9
                top = (rhs[up] / nz[up, None, None]).min(axis=0)
                inside = np.ones_like(top, dtype=bool)
                if down.any():
                    inside &= top >= (rhs[down] / nz[down, None, None]).max(axis=0)
                side = ~(up | down)
                if side.any():
                    inside &= (rhs[side] >= 0).all(axis=0)
                window = heights[r0:r1, c0:c1]
                np.maximum(window, np.where(inside, top, 0.0), out=window)
        return heights

    def _pybullet_heightmap(self, centre_xy, gripper_position) -> np.ndarray:
        """Height map from TinyRenderer or rayTestBatch, with the gripper parked far away for the render."""
        sim = self.sim
        _, orientation = sim.getBasePositionAndOrientation(self.gripper)
        sim.resetBasePositionAndOrientation(self.gripper, (0, 0, 50.0), orientation)
        size, eye_height = self.image_size, 1.0
        if self.renderer == "tiny":
            half = self.pixel_size * size / 2
            near, far = 0.5, eye_height + 0.01
            # Orthographic projection (column-major, OpenGL), up vector -x: image rows grow with +x.
            projection = [1 / half, 0, 0, 0, 0, 1 / half, 0, 0, 0, 0, -2 / (far - near), 0,
                          0, 0, -(far + near) / (far - near), 1]
            # TinyRenderer samples half a pixel off the pixel centres (measured); shifting the camera by that
            # half pixel makes its image match the analytic one pixel for pixel.
            cx, cy = centre_xy[0] - 0.5 * self.pixel_size, centre_xy[1] + 0.5 * self.pixel_size
            view = sim.computeViewMatrix((cx, cy, eye_height), (cx, cy, 0), (-1, 0, 0))
            depth = np.asarray(sim.getCameraImage(size, size, view, projection, renderer=pb.ER_TINY_RENDERER)[3],
                               dtype=np.float64).reshape(size, size)
            # TinyRenderer reads near/far off the matrix as if it were a perspective one and stores a perspective
            # depth; invert that (measured: this reproduces the analytic heights to rounding).
            a, b = projection[10], projection[14]
            near_read, far_read = b / (a - 1), b / (a + 1)
            distance = far_read * near_read / (far_read - depth * (far_read - near_read))
            heights = eye_height - distance
        else:
            rows_x, cols_y = self._pixel_centres(centre_xy)
            xs, ys = np.meshgrid(rows_x, cols_y, indexing="ij")
            starts = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, eye_height)], axis=1)
            ends = starts.copy()
            ends[:, 2] = -0.01
            heights = np.zeros(xs.size)
            for first in range(0, xs.size, 16383):  # pybullet caps a batch at 16383 rays
                hits = sim.rayTestBatch(starts[first:first + 16383].tolist(), ends[first:first + 16383].tolist())
                heights[first:first + len(hits)] = [hit[3][2] if hit[0] >= 0 else 0.0 for hit in hits]
            heights = heights.reshape(size, size)
        sim.resetBasePositionAndOrientation(self.gripper, gripper_position, orientation)
        return np.maximum(heights, 0.0)

    def _paint_fingers(self, heights, centre_xy):
        """Paint both finger footprints with the fingertips' height (the gripper stays upright)."""
        rows_x, cols_y = self._pixel_centres(centre_xy)
        for link in (0, 1):
            position, orientation = self.body_pose(self.gripper, link)
            yaw = quaternion_yaw(orientation)
            jaw_axis, closing_axis = np.array([math.cos(yaw), math.sin(yaw)]), np.array([-math.sin(yaw), math.cos(yaw)])
            dx, dy = rows_x[:, None] - position[0], cols_y[None, :] - position[1]
            inside = ((np.abs(dx * jaw_axis[0] + dy * jaw_axis[1]) <= FINGER_HALF[0])
                      & (np.abs(dx * closing_axis[0] + dy * closing_axis[1]) <= FINGER_HALF[1]))
            heights[inside] = max(position[2] - FINGER_HALF[2], 0.0)

    def _paint_goal(self, heights, centre_xy):
        """Goal squares have no body; they are painted as a thin patch under everything else."""
        if self.goal is None:
            return
        rows_x, cols_y = self._pixel_centres(centre_xy)
        yaw, (gx, gy) = self.goal["yaw"], self.goal["position"][:2]
        dx, dy = rows_x[:, None] - gx, cols_y[None, :] - gy
        u = dx * math.cos(yaw) + dy * math.sin(yaw)
        v = -dx * math.sin(yaw) + dy * math.cos(yaw)
        half = self.goal["size"] / 2
        inside = (np.abs(u) <= half) & (np.abs(v) <= half)
        heights[inside] = np.maximum(heights[inside], GOAL_MARK_HEIGHT)

    # ---- planner helpers ----
    planning_discrete = False  # set by expert_action(discrete=...) while the planner runs

    def action_toward(self, target, target_yaw: float, gripper: float, yaw_period: float = math.pi) -> np.ndarray:
        """Normalised action moving toward a waypoint: each component clamped to one step, the target height
        clipped to the allowed range; the yaw error is taken modulo `yaw_period` (the symmetry of what is grasped).
        x and y are not clipped here (the env clips the executed move): a clip at the workspace edge would tie the
        expert to the square's orientation and break its rotation equivariance in the interior.

        Planning for whole steps, each component is rounded to the nearest step (half to even: the rounding is
        odd-symmetric, so a turned scene still gives the turned action), and the fingers open or close fully. A
        waypoint on the floor or the ceiling is taken exactly: the env clips the move there, so a full step toward
        it ends on it, where rounding would stop the gripper up to half a step short."""
        position, yaw = self.gripper_pose()
        target = np.asarray(target, dtype=float).copy()
        target[2] = np.clip(target[2], *Z_RANGE)
        delta = (target - position) / self.dpos
        dyaw = wrap_angle(target_yaw - yaw, yaw_period) / self.drot
        if self.planning_discrete:  # a long move keeps its direction (clipping x and y apart bends it to 45 degrees)
            delta[:2] /= max(1.0, float(np.max(np.abs(delta[:2]))))
        action = np.clip(np.array([2 * gripper - 1, *delta, dyaw]), -1.0, 1.0)
        if self.planning_discrete:
            action = np.rint(action)
            action[0] = 1.0 if gripper > 0.5 else -1.0
            if target[2] in Z_RANGE and abs(target[2] - position[2]) > 1e-3:
                action[3] = math.copysign(1.0, target[2] - position[2])
        return action.astype(np.float32)

    def within_one_step(self, target, target_yaw: float, yaw_period: float = math.pi) -> bool:
        """Whether one unsaturated action lands exactly on the waypoint (planning for whole steps: within half a
        step of it in every component, where the grid lets the gripper get)."""
        position, yaw = self.gripper_pose()
        target = np.asarray(target, dtype=float).copy()
        target[2] = np.clip(target[2], *Z_RANGE)
        if self.planning_discrete:
            action = self.action_toward(target, target_yaw, 0.0, yaw_period)
            landing = np.clip(position + action[1:4] * self.dpos, self.workspace[:, 0], self.workspace[:, 1])
            yaw_left = wrap_angle(target_yaw - yaw - action[4] * self.drot, yaw_period)
            return bool(np.all(np.abs(target - landing) <= self.dpos / 2 + 1e-9)
                        and abs(yaw_left) <= self.drot / 2 + 1e-9)
        return bool(np.all(np.abs(target - position) <= self.dpos + 1e-9)
                    and abs(wrap_angle(target_yaw - yaw, yaw_period)) <= self.drot + 1e-9)


# ---- gym.make's max_episode_steps -------------------------------------------------------------------------------
ADOPT_TIME_LIMIT = WrapperSpec(name="AdoptTimeLimit", entry_point=f"{__name__}:adopt_time_limit", kwargs={})


def adopt_time_limit(env: gym.Env) -> gym.Env:
    """The tasks' registered additional wrapper, which adds no wrapper. `gym.make(id, max_episode_steps=N)` puts a
    TimeLimit(N) around the env, which would truncate at N while the env truncates at its own `max_steps` (50): the
    env takes N as its `max_steps` and the TimeLimit is dropped, so an episode is truncated in one place, by one
    count (the env's, which a scene state also carries), and `env.spec.max_episode_steps` reports N."""
    base = env.unwrapped
    if isinstance(base, ManipulationEnv):
        base._time_limit_adopted = True  # from now on its spec lists this hook, for gym.make(env.spec)
    if not (isinstance(env, gym.wrappers.TimeLimit) and isinstance(base, ManipulationEnv)):
        return env
    # Make's argument, read off the TimeLimit itself: asking for its spec would make the wrappers inside it cache a
    # spec that still has the old limit.
    limit = env._max_episode_steps
    spec = base.__dict__.get("_spec")
    given = spec.kwargs.get("max_steps") if spec is not None else None
    if given is not None and given != limit:
        raise ValueError(f"{spec.id}: gym.make got max_episode_steps={limit} and max_steps={given}, two episode "
                         f"limits that disagree; give one of them, or the same number to both.")
    base.max_steps = limit
    return env.env


def _outward_triangles(vertices: np.ndarray) -> list[int]:
    """Triangle indices of a convex hull, wound counter-clockwise seen from outside (for the visual mesh)."""
    hull = ConvexHull(vertices)
    centre = vertices.mean(axis=0)
    indices = []
    for simplex in hull.simplices:
        a, b, c = vertices[simplex]
        if np.dot(np.cross(b - a, c - a), a - centre) < 0:
            simplex = simplex[[0, 2, 1]]
        indices += [int(i) for i in simplex]
    return indices
