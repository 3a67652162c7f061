"""The eight close-loop manipulation tasks: objects, randomisation, success checks and expert planners.

Conventions (action, observation, frames) are in `cleanrl_equi.envs.manipulation.scene`. Every task is registered with
gymnasium as `cleanrl_equi/<Name>-v0` when `cleanrl_equi` is imported. Sizes follow BulletArm's close-loop
defaults (5 cm cubes, 8 x 8 x 4 cm flat blocks, a 0.3 m workspace); the drawer, bowl, roof and corner are built here
from boxes and a convex hull.

The ICLR-2022 paper (Wang, Walters, Platt, "SO(2)-Equivariant Reinforcement Learning") ran an earlier version of
these environments whose tasks differ in a few sizes and thresholds; the tasks take them as kwargs, and
`PAPER_TASK_KWARGS` lists the paper's values: Block Pulling blocks 10 x 10 x 5 cm of 0.5 kg, Block Picking and
Corner Picking succeed once the cube is held above 0.08 m (not 0.15 m and 0.1 m), and the corner's cube is the
plain 5 cm cube (BulletArm enlarged it to 6 cm). The paper's workspace (0.4 m), rotation step (pi/8) and episode
limit (100) are the base env's kwargs (`workspace_size`, `drot`, `max_steps`).

Planners are deterministic waypoint followers that re-read the object poses at every step: each action moves
toward the current waypoint with every component clamped to one step (dpos / drot), and the waypoint that
applies is chosen from the scene (is the object held? is the gripper above it? is the cube still in the corner?),
so a slip is corrected instead of derailing a fixed script. Only choices that must not flip mid-episode (which
block to drag) are kept in `planner_memory`, which is part of the scene state. Everything they compute is built
from positions relative to the gripper and yaw differences, so rotating the scene rotates the (dx, dy) they output
and leaves p, dz and dtheta unchanged (the symmetry test relies on it).

`expert_action(discrete=True)` plans for an agent of whole steps (the DQN's: each component -1, 0 or +1 step): the
waypoint checks accept half a step (`near_xy`, `yaw_near`, `slack`), and where the grid cannot reach a waypoint the
planner picks one it can (a grid point between drawer front and handle, a push along a grid direction). The grid
turns onto itself under quarter turns, so the symmetry holds for those; the one exception is a push whose starting
point would lie outside the workspace, where the planner takes the next grid direction instead.
"""

from __future__ import annotations

import math

import numpy as np

from cleanrl_equi.envs.manipulation.scene import (  # first: it imports pybullet without its build-time line
    FINGER_HALF,
    FINGER_MAX,
    Z_RANGE,
    ManipulationEnv,
    Piece,
    box,
    wrap_angle,
    yaw_quaternion,
)
from cleanrl_equi.envs.manipulation.scene import pb

TASK_NAMES = ("BlockPulling", "BlockPushing", "BlockPicking", "DrawerOpening", "BlockInBowl", "BlockStacking",
              "HouseBuilding", "CornerPicking")

# The paper's task settings where they differ from the defaults here (see the module docstring); tasks not listed
# are the same in both, or were not in the paper (Block Pushing, Block in Bowl).
PAPER_TASK_KWARGS = {
    "BlockPulling": {"block_size": (0.1, 0.1, 0.05), "block_mass": 0.5},
    "BlockPicking": {"lift_height": 0.08},
    "CornerPicking": {"cube_size": 0.05, "lift_height": 0.08},
}

CUBE = 0.05  # edge of the cubes (BulletArm's block size)
QUARTER = math.pi / 2
XY_TOLERANCE = 0.005  # how close above a waypoint the gripper must be before it descends
YAW_TOLERANCE = 0.05
GRASP_CLEARANCE = 0.01  # fingertips stop this far above the bottom of what they grasp
PUSH_OPENING = 0.3  # half-closed fingers (2.4 cm apart): two contacts on a face, a stable pusher


def cube_pieces(edge: float = CUBE) -> list[Piece]:
    return [box((edge / 2,) * 3)]


def _check_range(env, name: str, value, low: float, high: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{type(env).__name__}: {name} must be {what} in [{low}, {high}], got {value!r}.")
    return float(value)


ROOF_BOTTOM = -0.017  # the roof's bottom face in its body frame


def roof_pieces() -> list[Piece]:
    """A house roof: a pentagonal prism 10 cm long, 5 cm wide, 4.5 cm tall; vertical 2 cm sides to grasp.
    The frame origin is near the centre of mass (1.7 cm above the bottom)."""
    profile = [(-0.025, 0.0), (0.025, 0.0), (0.025, 0.02), (0.0, 0.045), (-0.025, 0.02)]
    vertices = [(x, y, z + ROOF_BOTTOM) for x in (-0.05, 0.05) for y, z in profile]
    return [Piece(hull_vertices=np.array(vertices))]


def random_yaw(rng) -> float:
    return float(rng.uniform(-math.pi, math.pi))


def inside_square(points, half_size: float, margin: float = 0.0) -> bool:
    return bool(np.all(np.abs(np.asarray(points)[..., :2]) <= half_size - margin))


class _TaskEnv(ManipulationEnv):
    """Shared planner building blocks: pick an object, carry and place it, retreat."""

    def sample_xy(self, padding: float) -> np.ndarray:
        half = self.workspace_size / 2 - padding
        return self.np_random.uniform(-half, half, size=2)

    def sample_two_apart(self, padding_a: float, padding_b: float, min_distance: float) -> tuple[np.ndarray, np.ndarray]:
        """Two positions (a first, then b, on every try) whose centres are at least `min_distance` apart."""
        while True:
            a, b = self.sample_xy(padding_a), self.sample_xy(padding_b)
            if np.linalg.norm(a - b) >= min_distance:
                return a, b

    def bottom_height(self, body: int) -> float:
        return float(self.sim.getAABB(body)[0][2])

    def top_height(self, body: int) -> float:
        return float(self.sim.getAABB(body)[1][2])

    # Planning for whole steps (expert_action(discrete=True)), the gripper can only get within half a step of a
    # waypoint in each of x, y, z and yaw: these checks accept that, and are the plain tolerances otherwise.
    def near_xy(self, target_xy, tolerance: float = XY_TOLERANCE) -> bool:
        """The gripper is above `target_xy` to within `tolerance` (or as near as whole steps get it)."""
        offset = self.gripper_pose()[0][:2] - np.asarray(target_xy)[:2]
        if np.linalg.norm(offset) <= tolerance:
            return True
        return self.planning_discrete and bool(np.all(np.abs(offset) <= self.dpos / 2 + 1e-9))

    def yaw_near(self, error: float, tolerance: float = YAW_TOLERANCE) -> bool:
        """A yaw error within `tolerance` (or as small as whole steps make it)."""
        return abs(error) <= tolerance or (self.planning_discrete and abs(error) <= self.drot / 2 + 1e-9)

    def slack(self, tolerance: float) -> float:
        """A height or distance tolerance, widened to half a step when planning for whole steps."""
        return max(tolerance, self.dpos / 2) if self.planning_discrete else tolerance

    def hover_over(self, body: int) -> float:
        return min(self.top_height(body) + 0.03, Z_RANGE[1])

    def pick_action(self, body: int, yaw_period: float = QUARTER) -> np.ndarray | None:
        """Go above the object with open fingers, descend, close on the step that lands on the grasp pose.
        Returns None once the object is held (the caller decides what to do with it)."""
        if self.is_held(body):
            return None
        position, yaw = self.gripper_pose()
        target, _ = self.body_pose(body)
        grasp_yaw = self.body_yaw(body)  # fingers close across the body's local y (a cube face or the roof's width)
        hover = self.hover_over(body)
        grasp = np.array([target[0], target[1], max(self.bottom_height(body) + GRASP_CLEARANCE, Z_RANGE[0])])
        if self.gripper_command < 0.5:  # closed but holding nothing (a miss, or the end of a press): open and rise
            return self.action_toward([target[0], target[1], max(position[2], hover)], grasp_yaw, 1.0, yaw_period)
        aligned = self.near_xy(grasp) and self.yaw_near(wrap_angle(grasp_yaw - yaw, yaw_period))
        if not aligned:
            return self.action_toward([grasp[0], grasp[1], hover], grasp_yaw, 1.0, yaw_period)
        if self.within_one_step(grasp, grasp_yaw, yaw_period):
            return self.action_toward(grasp, grasp_yaw, 0.0, yaw_period)  # land on the grasp pose, then close
        return self.action_toward(grasp, grasp_yaw, 1.0, yaw_period)

    def place_action(self, body: int, place_xy, place_bottom: float, yaw_change: float = 0.0,
                     yaw_period: float = QUARTER) -> np.ndarray:
        """Carry a held object so that its centre ends over `place_xy` with its bottom at `place_bottom`, turning
        it by `yaw_change` (mod yaw_period); open on the step that lands there."""
        position, yaw = self.gripper_pose()
        held_position, _ = self.body_pose(body)
        offset_xy = held_position[:2] - position[:2]  # a grasp is rarely exactly centred
        place_z = place_bottom - (self.bottom_height(body) - position[2])
        carry_z = min(place_z + 0.03, Z_RANGE[1])
        target_xy = np.asarray(place_xy) - offset_xy
        target_yaw = yaw + yaw_change
        distance = np.linalg.norm(target_xy - position[:2])
        if not (self.near_xy(target_xy) and self.yaw_near(wrap_angle(yaw_change, yaw_period))):
            if position[2] < carry_z - self.slack(0.005) and distance > 0.02:  # lift before carrying over others
                return self.action_toward([position[0], position[1], carry_z], target_yaw, 0.0, yaw_period)
            return self.action_toward([target_xy[0], target_xy[1], carry_z], target_yaw, 0.0, yaw_period)
        place = [target_xy[0], target_xy[1], place_z]
        if self.within_one_step(place, target_yaw, yaw_period):
            return self.action_toward(place, target_yaw, 1.0, yaw_period)
        return self.action_toward(place, target_yaw, 0.0, yaw_period)

    def retreat_action(self) -> np.ndarray:
        position, yaw = self.gripper_pose()
        return self.action_toward([position[0], position[1], position[2] + self.dpos], yaw, 1.0)

    def lift_action(self, height: float) -> np.ndarray:
        position, yaw = self.gripper_pose()
        return self.action_toward([position[0], position[1], height], yaw, 0.0)

    def resting_on(self, top: int, bottom: int, height_gap: float, tolerance: float = 0.012) -> bool:
        """`top` sits on `bottom`: touching, centred within half a cube, at the right height, off the table, free."""
        top_position, bottom_position = self.body_pose(top)[0], self.body_pose(bottom)[0]
        return (not self.holding
                and np.linalg.norm(top_position[:2] - bottom_position[:2]) < CUBE / 2
                and abs(top_position[2] - bottom_position[2] - height_gap) < tolerance
                and self.touching(top, bottom) and not self.touching(top, self.table))


# ---- Block Pulling ---------------------------------------------------------------------------------------------
FLAT_BLOCK = (0.08, 0.08, 0.04)  # BulletArm's flat block at its default scale
PULL_OFFSET = 0.07  # the gripper comes down at least this far behind the dragged block's centre


class BlockPullingEnv(_TaskEnv):
    """Two flat blocks (`block_size`, 8 x 8 x 4 cm by default; the paper's 10 x 10 x 5 cm); success when they
    touch. The planner drags one block into the other."""

    def __init__(self, block_size=FLAT_BLOCK, block_mass: float = 0.2, **kwargs):
        if not (isinstance(block_size, (tuple, list)) and len(block_size) == 3 and block_size[0] == block_size[1]
                and all(isinstance(v, (int, float)) and 0.03 <= v <= 0.12 for v in block_size)):
            raise ValueError(f"{type(self).__name__}: block_size must be (side, side, height) in metres, each in "
                             f"[0.03, 0.12], got {block_size!r}.")
        self.block_half = tuple(float(v) / 2 for v in block_size)
        self.block_mass = _check_range(self, "block_mass", block_mass, 0.01, 5.0, "a mass in kg")
        super().__init__(**kwargs)

    def _create_task_bodies(self):
        self.blocks = [self.add_body([box(self.block_half)], self.block_mass, color) for color in ("red", "blue")]

    def _pull_offset(self) -> float:
        # the fingers must come down clear of the dragged block's corner whatever its yaw
        return max(PULL_OFFSET, self.block_half[0] * math.sqrt(2) + FINGER_HALF[0] + 0.003)

    def _pull_point(self, dragged, other):
        direction = dragged - other
        return dragged + self._pull_offset() * direction / np.linalg.norm(direction)

    def _sample_scene(self):
        half, side = self.workspace_size / 2, self.block_half[0]
        while True:
            xy = [self.sample_xy(1.5 * side) for _ in range(2)]  # 6 cm for the default block
            if np.linalg.norm(xy[0] - xy[1]) < 3.5 * side:  # 14 cm apart (the paper's 10 cm blocks: 17.5)
                continue
            valid = [inside_square(self._pull_point(xy[i], xy[1 - i]), half, 0.005) for i in range(2)]
            if any(valid):
                break
        self.planner_memory = {"dragged": 0 if valid[0] else 1}
        for block, position in zip(self.blocks, xy):
            self.set_body_pose(block, (*position, self.block_half[2]), random_yaw(self.np_random))

    def _is_success(self):
        return self.touching(*self.blocks)

    def planner_action(self):
        dragged = self.blocks[self.planner_memory["dragged"]]
        other = self.blocks[1 - self.planner_memory["dragged"]]
        position, yaw = self.gripper_pose()
        dragged_xy, other_xy = self.body_pose(dragged)[0][:2], self.body_pose(other)[0][:2]
        direction = (dragged_xy - other_xy) / np.linalg.norm(dragged_xy - other_xy)
        pull_yaw = math.atan2(direction[1], direction[0])  # fingers side by side across the pulling line
        start = self._pull_point(dragged_xy, other_xy)
        low = Z_RANGE[0]
        relative = position[:2] - dragged_xy
        along, across = relative @ direction, relative @ np.array([-direction[1], direction[0]])
        behind = along > self.block_half[0] + 0.005 and abs(across) < 0.03
        yaw_error = abs(wrap_angle(pull_yaw - yaw, math.pi))
        if behind and yaw_error < 0.4 and position[2] <= low + self.slack(0.005):
            # Drag until the blocks' centres are one block width apart (they touch at or before that), so the
            # dragged block is not flung past the other one.
            travel = min(np.linalg.norm(dragged_xy - other_xy) - 2 * self.block_half[0] + 0.01, 2 * self.dpos)
            if self.planning_discrete:  # a shorter pull would round to standing still
                travel = max(travel, self.dpos)
            target = position[:2] - travel * direction
            return self.action_toward([target[0], target[1], low], pull_yaw, PUSH_OPENING)
        yaw_ok = self.yaw_near(yaw_error)
        if self.near_xy(start) and yaw_ok:
            return self.action_toward([start[0], start[1], low], pull_yaw, PUSH_OPENING)
        return self.action_toward([start[0], start[1], 0.08], pull_yaw, PUSH_OPENING)


# ---- Block Pushing ---------------------------------------------------------------------------------------------
GOAL_SIZE = 0.08
PUSH_START = 0.06  # behind the cube centre: half a cube diagonal, a finger, and a margin
PUSH_CONTACT = CUBE / 2 + FINGER_HALF[0]  # gripper-to-cube-centre distance while pushing a face


class BlockPushingEnv(_TaskEnv):
    """A cube and an 8 cm goal square (painted into the image); success when the cube's centre is inside the
    square. The planner pushes with half-closed fingers along the cube-goal line."""

    def _create_task_bodies(self):
        self.cube = self.add_body(cube_pieces(), 0.1, "red")

    def _sample_scene(self):
        half = self.workspace_size / 2
        while True:
            cube_xy, goal_xy = self.sample_xy(0.04), self.sample_xy(0.05)
            distance = np.linalg.norm(goal_xy - cube_xy)
            if distance < 0.09:
                continue
            if inside_square(cube_xy - PUSH_START * (goal_xy - cube_xy) / distance, half, 0.005):
                break
        self.set_body_pose(self.cube, (*cube_xy, CUBE / 2), random_yaw(self.np_random))
        self.set_goal({"position": [float(goal_xy[0]), float(goal_xy[1])], "yaw": random_yaw(self.np_random),
                       "size": GOAL_SIZE})

    def _goal_frame_offset(self) -> np.ndarray:
        cube_xy = self.body_pose(self.cube)[0][:2]
        delta = cube_xy - np.asarray(self.goal["position"])
        yaw = self.goal["yaw"]
        return np.array([delta[0] * math.cos(yaw) + delta[1] * math.sin(yaw),
                         -delta[0] * math.sin(yaw) + delta[1] * math.cos(yaw)])

    def _is_success(self):
        return bool(np.all(np.abs(self._goal_frame_offset()) <= GOAL_SIZE / 2))

    def planner_action(self):
        position, yaw = self.gripper_pose()
        cube_xy, goal_xy = self.body_pose(self.cube)[0][:2], np.asarray(self.goal["position"])
        direction = (goal_xy - cube_xy) / max(np.linalg.norm(goal_xy - cube_xy), 1e-6)
        low = Z_RANGE[0]
        relative = position[:2] - cube_xy
        if self.planning_discrete:
            # Whole steps push along one of the eight grid directions (the one a rounded move toward the goal
            # takes), re-chosen as the cube nears the goal: a push along any other line would zigzag off the cube.
            # A push already under way goes on while its direction is within 35 degrees of the goal's, so that a
            # goal near the boundary between two directions does not send the gripper back and forth.
            nearest = np.rint(direction / np.max(np.abs(direction)))
            grid = [np.array([i, j]) / math.hypot(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1) if i or j]
            pushing = [d for d in grid if d @ direction >= math.cos(math.radians(35))
                       and relative @ d < -PUSH_CONTACT + 0.01 and abs(relative @ [-d[1], d[0]]) < 0.012 + self.dpos / 2
                       and self.yaw_near(wrap_angle(math.atan2(d[1], d[0]) - yaw, math.pi))
                       and position[2] <= low + self.slack(0.005)]
            # (else the nearest direction whose starting point the gripper can reach inside the workspace)
            reachable = [d for d in grid if inside_square(cube_xy - PUSH_START * d, self.workspace_size / 2)]
            if pushing:
                direction = max(pushing, key=lambda d: d @ direction)
            elif reachable and not inside_square(cube_xy - PUSH_START * nearest / np.linalg.norm(nearest),
                                                 self.workspace_size / 2):
                direction = max(reachable, key=lambda d: d @ direction)
            else:
                direction = nearest / np.linalg.norm(nearest)
        push_yaw = math.atan2(direction[1], direction[0])
        start = cube_xy - PUSH_START * direction
        along, across = relative @ direction, relative @ np.array([-direction[1], direction[0]])
        side_room = 0.012 + (self.dpos / 2 if self.planning_discrete else 0)  # whole steps: up to half a step off
        behind = along < -PUSH_CONTACT + 0.01 and abs(across) < side_room
        yaw_ok = self.yaw_near(wrap_angle(push_yaw - yaw, math.pi))
        if behind and yaw_ok and position[2] <= low + self.slack(0.005):
            end = goal_xy - PUSH_CONTACT * direction  # where the gripper is when the cube's centre is on the goal
            if self.planning_discrete:  # a full step along the line until the cube is in (the episode ends there)
                end = position[:2] + self.dpos * direction
            return self.action_toward([end[0], end[1], low], push_yaw, PUSH_OPENING)
        if self.near_xy(start) and yaw_ok:
            return self.action_toward([start[0], start[1], low], push_yaw, PUSH_OPENING)
        return self.action_toward([start[0], start[1], CUBE + 0.02], push_yaw, PUSH_OPENING)


# ---- Block Picking ---------------------------------------------------------------------------------------------
class BlockPickingEnv(_TaskEnv):
    """One cube; success when it is held with the fingertips above `lift_height` (0.15 m, BulletArm's threshold;
    the paper's 0.08 m, which is also its Object Picking threshold)."""

    def __init__(self, lift_height: float = 0.15, **kwargs):
        self.lift_height = _check_range(self, "lift_height", lift_height, 0.03, Z_RANGE[1] - 0.05, "a height in metres")
        super().__init__(**kwargs)

    def _create_task_bodies(self):
        self.cube = self.add_body(cube_pieces(), 0.1, "red")

    def _sample_scene(self):
        self.set_body_pose(self.cube, (*self.sample_xy(0.04), CUBE / 2), random_yaw(self.np_random))

    def _is_success(self):
        return self.is_held(self.cube) and self.gripper_pose()[0][2] > self.lift_height

    def planner_action(self):
        action = self.pick_action(self.cube)
        return action if action is not None else self.lift_action(self.lift_height + 0.05)


# ---- Drawer Opening --------------------------------------------------------------------------------------------
CABINET = (0.16, 0.16, 0.10)  # depth (along the opening direction), width, height
WALL = 0.01
HANDLE_GAP = 0.035  # room between the drawer front and the handle bar for the closed fingers
HOOK_HEIGHT = 0.025  # fingertip height while pulling: the fingers cover the bar at 4.25-5.75 cm
DRAWER_TRAVEL = 0.2
OPEN_DISTANCE = 0.15


def cabinet_pieces() -> list[Piece]:
    depth, width, height = CABINET
    return [box((depth / 2, width / 2, WALL / 2), (0, 0, height - WALL / 2)),
            box((depth / 2, width / 2, WALL / 2), (0, 0, WALL / 2)),
            box((WALL / 2, width / 2, height / 2), (-depth / 2 + WALL / 2, 0, height / 2)),
            box((depth / 2, WALL / 2, height / 2), (0, width / 2 - WALL / 2, height / 2)),
            box((depth / 2, WALL / 2, height / 2), (0, -width / 2 + WALL / 2, height / 2))]


def drawer_pieces() -> list[Piece]:
    """The sliding drawer at joint value 0: front panel flush with the cabinet, a tray behind it, a bar handle."""
    depth, width, height = CABINET
    inner_width = width / 2 - WALL - 0.002
    bar_x = depth / 2 + HANDLE_GAP + 0.005
    return [box((WALL / 2, inner_width, height / 2 - WALL - 0.002), (depth / 2 - WALL / 2, 0, height / 2)),
            box((depth / 2 - WALL - 0.002, inner_width, WALL / 2), (0, 0, WALL * 1.5 + 0.002)),
            box((WALL / 2, inner_width, 0.02), (-depth / 2 + WALL * 1.5 + 0.002, 0, 0.04)),
            box((0.005, 0.04, 0.0075), (bar_x, 0, height / 2)),
            *[box((HANDLE_GAP / 2, 0.005, 0.0075), (depth / 2 + HANDLE_GAP / 2, side * 0.035, height / 2))
              for side in (-1, 1)]]


class DrawerOpeningEnv(_TaskEnv):
    """A cabinet (16 x 16 x 10 cm, static) whose drawer slides out along the cabinet's +x; success when it is
    out by more than 0.15 m. The planner hooks the closed fingers behind the handle bar and pulls."""

    def _create_task_bodies(self):
        self.drawer = self.add_sliding_body(cabinet_pieces(), drawer_pieces(), DRAWER_TRAVEL, "wood", "yellow")

    def _hook_point(self, cabinet_xy, yaw, opened):
        """Where the gripper sits between drawer front and handle bar, touching the bar from inside."""
        distance = CABINET[0] / 2 + HANDLE_GAP - FINGER_HALF[0] - 0.003 + opened
        return np.asarray(cabinet_xy) + distance * np.array([math.cos(yaw), math.sin(yaw)])

    def _sample_scene(self):
        size = self.workspace_size
        while True:
            yaw = random_yaw(self.np_random)
            outward = np.array([math.cos(yaw), math.sin(yaw)])
            across = np.array([-outward[1], outward[0]])
            centre = (-outward * self.np_random.uniform(0.4 * size, 0.53 * size)
                      + across * self.np_random.uniform(-0.15 * size, 0.15 * size))
            hooks = [self._hook_point(centre, yaw, opened) for opened in (0.0, OPEN_DISTANCE + 0.03)]
            if inside_square(np.array(hooks), size / 2, 0.01):
                break
        self.set_body_pose(self.drawer, (*centre, 0.0), yaw)
        self.sim.resetJointState(self.drawer, 0, 0.0, 0.0)

    def opened(self) -> float:
        return float(self.sim.getJointState(self.drawer, 0)[0])

    def _is_success(self):
        return self.opened() > OPEN_DISTANCE

    # Planning for whole steps, the gripper reaches only the points of a grid of step dpos through where it is,
    # and the room between drawer front and handle bar (3.5 cm, 1.3 cm of it free around closed fingers) often
    # holds none of them. So the planner picks a grid point that fits: one in that room to hook the bar (as the
    # continuous planner does), else one where open fingers straddle the bar (2.3 cm of room: always one), to close
    # on it. Either way it pulls by the whole step that keeps the fingers on the bar and opens the drawer most.
    def _grid_point(self, cabinet_xy, outward, ideal, along_range, side_max: float, here_slack: float):
        """The grid point nearest `ideal` whose distance out from the cabinet centre is within `along_range` and
        whose distance from the bar's middle is at most `side_max` (where the gripper is, `here_slack` more out
        counts: pulling presses on the bar); with the pulling step from there. (None, None) where none fits."""
        position = self.gripper_pose()[0][:2]
        across = np.array([-outward[1], outward[0]])
        steps = np.arange(-12, 13)
        points = position + self.dpos * np.stack(np.meshgrid(steps, steps, indexing="ij"), -1).reshape(-1, 2)
        along, side = (points - cabinet_xy) @ outward, np.abs((points - cabinet_xy) @ across)
        low, high = along_range
        fits = (along >= low) & (along <= high) & (side <= side_max)
        here = len(points) // 2
        if low <= along[here] <= high + here_slack and side[here] <= side_max:
            fits[:] = False
            fits[here] = True
        if not fits.any():
            return None, None
        point = points[fits][np.argmin(np.linalg.norm(points[fits] - ideal, axis=1))]
        moves = self.dpos * np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1) if i or j])
        gain = moves @ outward
        gain[(np.abs((point + moves - cabinet_xy) @ across) > side_max) | (gain <= 0)] = -np.inf
        pull = moves[np.argmax(gain)] if np.isfinite(gain).any() else self.dpos * outward
        return point, point + pull

    def _grid_action(self, cabinet_xy, cabinet_yaw, outward):
        """The whole-step planner: hook where a grid point fits, else grasp the bar."""
        position, yaw = self.gripper_pose()
        front = CABINET[0] / 2 + self.opened()  # the drawer front's distance out from the cabinet centre
        bar = front + HANDLE_GAP + 0.005  # the bar's middle
        along = (position[:2] - cabinet_xy) @ outward
        if self.gripper_command < 0.5 and abs(along - bar) < 0.012 and position[2] < 0.06:  # holding the bar
            _, target = self._grid_point(cabinet_xy, outward, position[:2], (along - 1e-6, along + 1e-6), 0.03, 0.0)
            target = position[:2] + self.dpos * outward if target is None else target
            return self.action_toward([target[0], target[1], position[2]], yaw, 0.0)
        low_enough = position[2] <= HOOK_HEIGHT + 0.01
        hook, target = self._grid_point(cabinet_xy, outward, self._hook_point(cabinet_xy, cabinet_yaw, self.opened()),
                                        (front + FINGER_HALF[0] + 0.001, front + HANDLE_GAP - FINGER_HALF[0] - 0.001),
                                        0.02, 0.003 if low_enough else 0.0)
        if hook is not None:
            if self.gripper_command > 0.5:  # open from an earlier grasp: close above the drawer first
                return self.action_toward([position[0], position[1], CABINET[2] + 0.02], cabinet_yaw, 0.0)
            yaw_ok = self.yaw_near(wrap_angle(cabinet_yaw - yaw, math.pi))
            if self.near_xy(hook, 0.01) and yaw_ok and low_enough:  # hooked: pull one step out
                return self.action_toward([target[0], target[1], HOOK_HEIGHT], cabinet_yaw, 0.0)
            if self.near_xy(hook) and yaw_ok:
                return self.action_toward([hook[0], hook[1], HOOK_HEIGHT], cabinet_yaw, 0.0)
            return self.action_toward([hook[0], hook[1], CABINET[2] + 0.02], cabinet_yaw, 0.0)
        # Straddle the bar with open fingers (closing across it), the fingertips low enough to cover it.
        grasp_yaw, grasp_z = cabinet_yaw + math.pi / 2, 0.04
        reach = FINGER_MAX + 2 * FINGER_HALF[1]  # the centre to an open finger's outer face
        grasp, _ = self._grid_point(cabinet_xy, outward, bar * outward + cabinet_xy,
                                    (front + reach + 0.001, front + HANDLE_GAP + FINGER_MAX - 0.001), 0.016, 0.0)
        if grasp is None:
            grasp = cabinet_xy + (front + HANDLE_GAP / 2 + FINGER_MAX) * outward
        if self.gripper_command < 0.5:  # closed on nothing: open above the drawer
            return self.action_toward([position[0], position[1], CABINET[2] + 0.03], grasp_yaw, 1.0)
        if self.near_xy(grasp) and self.yaw_near(wrap_angle(grasp_yaw - yaw, math.pi)):
            closing = self.within_one_step([grasp[0], grasp[1], grasp_z], grasp_yaw)
            return self.action_toward([grasp[0], grasp[1], grasp_z], grasp_yaw, 0.0 if closing else 1.0)
        return self.action_toward([grasp[0], grasp[1], CABINET[2] + 0.03], grasp_yaw, 1.0)

    def planner_action(self):
        position, yaw = self.gripper_pose()
        cabinet_xy, cabinet_yaw = self.body_pose(self.drawer)[0][:2], self.body_yaw(self.drawer)
        hook = self._hook_point(cabinet_xy, cabinet_yaw, self.opened())
        outward = np.array([math.cos(cabinet_yaw), math.sin(cabinet_yaw)])
        if self.planning_discrete:
            return self._grid_action(cabinet_xy, cabinet_yaw, outward)
        yaw_ok = abs(wrap_angle(cabinet_yaw - yaw, math.pi)) <= YAW_TOLERANCE
        distance = np.linalg.norm(position[:2] - hook)
        if distance <= 0.01 and yaw_ok and position[2] <= HOOK_HEIGHT + 0.01:  # hooked: pull one step out
            target = hook + self.dpos * outward
            return self.action_toward([target[0], target[1], HOOK_HEIGHT], cabinet_yaw, 0.0)
        if distance <= XY_TOLERANCE and yaw_ok:
            return self.action_toward([hook[0], hook[1], HOOK_HEIGHT], cabinet_yaw, 0.0)
        return self.action_toward([hook[0], hook[1], CABINET[2] + 0.02], cabinet_yaw, 0.0)


# ---- Block in Bowl ---------------------------------------------------------------------------------------------
BOWL_BASE = 0.045  # apothem of the octagonal floor
BOWL_TILT = math.radians(35)
BOWL_RIM = 0.05  # height of the rim above the table


def bowl_pieces() -> list[Piece]:
    """A shallow octagonal bowl: two square plates make the floor, eight slabs lean outward as the wall."""
    pieces = [box((BOWL_BASE, BOWL_BASE, 0.005), (0, 0, 0.005), yaw=angle) for angle in (0.0, math.pi / 4)]
    slab_half = (0.004, 0.026, 0.025)  # thickness, tangential half-width, half-length along the slope
    foot = BOWL_BASE + 0.002
    for k in range(8):
        azimuth = k * math.pi / 4
        radial = foot + slab_half[2] * math.sin(BOWL_TILT) + slab_half[0] * math.cos(BOWL_TILT)
        height = 0.008 + slab_half[2] * math.cos(BOWL_TILT) - slab_half[0] * math.sin(BOWL_TILT)
        tilt = (0.0, math.sin(BOWL_TILT / 2), 0.0, math.cos(BOWL_TILT / 2))  # leans the slab's top outward
        orientation = pb.multiplyTransforms((0, 0, 0), yaw_quaternion(azimuth), (0, 0, 0), tilt)[1]
        pieces.append(box(slab_half, (radial * math.cos(azimuth), radial * math.sin(azimuth), height),
                          orientation=orientation))
    return pieces


class BlockInBowlEnv(_TaskEnv):
    """A cube and a free octagonal bowl (16 cm across); success when the released cube rests in the upright
    bowl, touching it, within 3.5 cm of its centre."""

    def _create_task_bodies(self):
        self.cube = self.add_body(cube_pieces(), 0.1, "red")
        self.bowl = self.add_body(bowl_pieces(), 0.4, "white")

    def _sample_scene(self):
        cube_xy, bowl_xy = self.sample_two_apart(0.04, 0.08, 0.16)
        self.set_body_pose(self.cube, (*cube_xy, CUBE / 2), random_yaw(self.np_random))
        self.set_body_pose(self.bowl, (*bowl_xy, 0.0), random_yaw(self.np_random))

    def _cube_over_bowl(self, distance: float) -> bool:
        cube, bowl = self.body_pose(self.cube)[0], self.body_pose(self.bowl)[0]
        return np.linalg.norm(cube[:2] - bowl[:2]) < distance and cube[2] < bowl[2] + BOWL_RIM + CUBE

    def _is_success(self):
        return (not self.holding and self._cube_over_bowl(0.035) and self.touching(self.cube, self.bowl)
                and self.upright_cosine(self.bowl) > math.cos(math.radians(30)))

    def planner_action(self):
        if not self.holding and self._cube_over_bowl(0.05):
            return self.retreat_action()  # released: let it settle
        action = self.pick_action(self.cube)
        if action is not None:
            return action
        bowl = self.body_pose(self.bowl)[0]
        return self.place_action(self.cube, bowl[:2], bowl[2] + BOWL_RIM + 0.01)


# ---- Block Stacking --------------------------------------------------------------------------------------------
class BlockStackingEnv(_TaskEnv):
    """Two cubes; success when one rests on the other (centred within half a cube, off the table, not held)."""

    def _create_task_bodies(self):
        self.cubes = [self.add_body(cube_pieces(), 0.1, color) for color in ("red", "green")]

    def _sample_scene(self):
        xy = self.sample_two_apart(0.04, 0.04, 0.12)
        for cube, position in zip(self.cubes, xy):
            self.set_body_pose(cube, (*position, CUBE / 2), random_yaw(self.np_random))

    def _is_success(self):
        return any(self.resting_on(top, bottom, CUBE) for top, bottom in (self.cubes, self.cubes[::-1]))

    def planner_action(self):
        moved, base = self.cubes
        base_position = self.body_pose(base)[0]
        if not self.holding and np.linalg.norm(self.body_pose(moved)[0][:2] - base_position[:2]) < CUBE / 2:
            return self.retreat_action()
        action = self.pick_action(moved)
        if action is not None:
            return action
        yaw_change = wrap_angle(self.body_yaw(base) - self.body_yaw(moved), QUARTER)
        return self.place_action(moved, base_position[:2], self.top_height(base) + 0.008, yaw_change)


# ---- House Building --------------------------------------------------------------------------------------------
class HouseBuildingEnv(_TaskEnv):
    """A cube and a roof; success when the roof rests upright (tilt < 20 degrees) on the cube, not held."""

    def _create_task_bodies(self):
        self.cube = self.add_body(cube_pieces(), 0.1, "green")
        self.roof = self.add_body(roof_pieces(), 0.1, "red")

    def _sample_scene(self):
        cube_xy, roof_xy = self.sample_two_apart(0.04, 0.06, 0.14)
        self.set_body_pose(self.cube, (*cube_xy, CUBE / 2), random_yaw(self.np_random))
        self.set_body_pose(self.roof, (*roof_xy, -ROOF_BOTTOM), random_yaw(self.np_random))

    def _is_success(self):
        return (self.resting_on(self.roof, self.cube, CUBE / 2 - ROOF_BOTTOM)
                and self.upright_cosine(self.roof) > math.cos(math.radians(20)))

    def planner_action(self):
        cube_position = self.body_pose(self.cube)[0]
        if not self.holding and np.linalg.norm(self.body_pose(self.roof)[0][:2] - cube_position[:2]) < CUBE / 2:
            return self.retreat_action()
        # The fingers close across the roof's width (its local y), so the gripper yaw matches the roof's, mod pi.
        action = self.pick_action(self.roof, yaw_period=math.pi)
        if action is not None:
            return action
        yaw_change = wrap_angle(self.body_yaw(self.cube) - self.body_yaw(self.roof), QUARTER)
        return self.place_action(self.roof, cube_position[:2], self.top_height(self.cube) + 0.008, yaw_change)


# ---- Corner Picking --------------------------------------------------------------------------------------------
CORNER_CUBE = 0.06  # BulletArm's corner cube is 1.2x the 5 cm block (the paper's is the 5 cm block)
CORNER_INNER = -0.09  # the walls' inner faces, in the corner frame (plate from -0.1 to 0.1)
PLATE = 0.01
SNUG = 0.002  # gap between the cube and each wall at the start
SLID_CLEARANCE = 0.04  # the planner slides the cube until this gap opens on both walls ...
PICK_CLEARANCE = 0.025  # ... and picks once the gap exceeds this (room for an open finger)


def corner_pieces() -> list[Piece]:
    return [box((0.1, 0.1, PLATE / 2), (0, 0, PLATE / 2)),
            box((0.005, 0.1, 0.03), (CORNER_INNER - 0.005, 0, PLATE + 0.03)),
            box((0.1, 0.005, 0.03), (0, CORNER_INNER - 0.005, PLATE + 0.03))]


class CornerPickingEnv(_TaskEnv):
    """A cube (`cube_size`, 6 cm by default; the paper's 5 cm) snug in a static corner (two 6 cm walls on a
    slippery plate); success when the cube is held with the fingertips above `lift_height` (0.1 m; the paper's
    0.08 m). Neither pair of faces can be grasped in the corner, so the planner presses on the cube with closed
    fingers, drags it out along the diagonal, then picks it."""

    def __init__(self, cube_size: float = CORNER_CUBE, lift_height: float = 0.1, **kwargs):
        self.cube_size = _check_range(self, "cube_size", cube_size, 0.04, 0.07, "an edge in metres")
        self.lift_height = _check_range(self, "lift_height", lift_height, 0.03, Z_RANGE[1] - 0.05, "a height in metres")
        super().__init__(**kwargs)

    def _corner_local(self, cube_gap: float) -> np.ndarray:
        """Cube centre (corner frame) with `cube_gap` between it and both walls."""
        return np.array([CORNER_INNER + self.cube_size / 2 + cube_gap] * 2)

    def _create_task_bodies(self):
        self.corner = self.add_body(corner_pieces(), 0.0, "grey", friction=0.02, free=False)
        self.cube = self.add_body(cube_pieces(self.cube_size), 0.1, "red")

    def _corner_to_world(self, local_xy) -> np.ndarray:
        origin, yaw = self.body_pose(self.corner)[0][:2], self.body_yaw(self.corner)
        c, s = math.cos(yaw), math.sin(yaw)
        return origin + np.array([c * local_xy[0] - s * local_xy[1], s * local_xy[0] + c * local_xy[1]])

    def _sample_scene(self):
        half = self.workspace_size / 2
        while True:
            yaw = random_yaw(self.np_random)
            cube_xy = self.sample_xy(0.045)
            c, s = math.cos(yaw), math.sin(yaw)
            rotation = np.array([[c, -s], [s, c]])
            origin = cube_xy - rotation @ self._corner_local(SNUG)
            slid = origin + rotation @ self._corner_local(SLID_CLEARANCE)
            if inside_square(slid, half, 0.05):
                break
        self.set_body_pose(self.corner, (*origin, 0.0), yaw)
        self.set_body_pose(self.cube, (*cube_xy, PLATE + self.cube_size / 2), yaw)

    def _wall_gaps(self) -> np.ndarray:
        """Smallest gap between the cube and each wall (corner frame x and y)."""
        corner_origin, corner_yaw = self.body_pose(self.corner)[0][:2], self.body_yaw(self.corner)
        position, orientation = self.body_pose(self.cube)
        rotation = np.array(self.sim.getMatrixFromQuaternion(orientation)).reshape(3, 3)
        corners = np.array([[sx, sy, 0.0] for sx in (-1, 1) for sy in (-1, 1)]) * self.cube_size / 2
        world = corners @ rotation.T + position
        c, s = math.cos(corner_yaw), math.sin(corner_yaw)
        relative = world[:, :2] - corner_origin
        local = relative @ np.array([[c, -s], [s, c]])  # world -> corner frame
        return local.min(axis=0) - CORNER_INNER

    def _is_success(self):
        return self.is_held(self.cube) and self.gripper_pose()[0][2] > self.lift_height

    def planner_action(self):
        if self.is_held(self.cube):
            return self.lift_action(self.lift_height + 0.05)
        # Whole steps put an open finger up to half a step nearer a wall: slide the cube that much further out.
        extra = self.dpos / 2 if self.planning_discrete else 0.0
        if np.all(self._wall_gaps() >= PICK_CLEARANCE + extra):
            return self.pick_action(self.cube)
        # Still in the corner: press on the top face and drag the cube out along the diagonal.
        position, yaw = self.gripper_pose()
        cube = self.body_pose(self.cube)[0]
        press_yaw = self.body_yaw(self.corner) + math.pi / 4
        top = self.top_height(self.cube)
        target_xy = self._corner_to_world(self._corner_local(SLID_CLEARANCE + extra))
        yaw_ok = self.yaw_near(wrap_angle(press_yaw - yaw, math.pi))
        press_z = top - 0.004
        if self.planning_discrete:  # aim half a step deeper, so that the rounded step still presses down
            press_z -= self.dpos / 2
        if self.near_xy(cube, 0.01) and yaw_ok and position[2] <= top + 0.002:  # pressing: drag
            return self.action_toward([target_xy[0], target_xy[1], press_z], press_yaw, 0.0)
        if self.near_xy(cube) and yaw_ok:
            return self.action_toward([cube[0], cube[1], press_z], press_yaw, 0.0)
        return self.action_toward([cube[0], cube[1], top + 0.03], press_yaw, 0.0)
