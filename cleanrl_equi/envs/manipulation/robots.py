"""Robot arms that carry the env's gripper: the Kuka iiwa of the ICLR-2022 paper and the Franka Panda of its CoRL-2022
follow-up, both from pybullet's own data folder, driven by inverse kinematics like BulletArm's robots.

The env's gripper (scene.py: palm and two coupled prismatic fingers) stays the end effector for every robot, so a
grasp, a push or a hooked drawer handle is the same contact problem with or without an arm, and the holding check,
the finger painting and the gripper metrics keep their meaning. With `robot="floating"` a world-fixed constraint
slides the gripper along the commanded displacement. With an arm, the gripper is welded to the arm's flange in place
of the arm's own hand (the Kuka's WSG-50 links of `kuka_with_gripper2.sdf`, the Panda's hand and fingers), whose
links stay on the arm as a load but neither collide nor move; the arm's seven joints follow the move in position
control, and contacts on the gripper load the arm's motors.

Placement: the base stands on the table on the workspace's -x side, facing +x, at 0.71 m (Kuka; BulletArm's 0.65 m
leaves the strip nearest the base beyond the elbow's bend limit, see ARMS) or 0.55 m (Panda, BulletArm's) from the
workspace centre; image rows grow with +x, away from the base. Motors (BulletArm's numbers): Kuka 200 N m per
joint, Panda 240 N m (BulletArm's Panda on pybullet_data's model), position gain 0.02 (its robots' default),
velocity gain 1.

A move. The target pose (current gripper pose plus the action's displacement, clipped to the workspace by the env)
is solved for the flange with `calculateInverseKinematics` (damped least squares, as BulletArm's robots). The Kuka
first takes its closed-form top-down posture (joint 1 turns toward the target, joints 2, 4 and 6 solve the
shoulder-elbow-wrist triangle elbow up and tilt the flange back to vertical, joints 3 and 5 stay at 0, joint 7
sets the yaw), which pybullet's solver then polishes: its posture is a function of the gripper pose, so it never
drifts over an episode, and a pose beyond reach puts the wrist as far toward it as the arm goes. The Panda (no such
closed form: its elbow is offset) is solved from the current joints, so the joints change as little as the move
needs (a zero action leaves the arm still); where that answer ends within 0.3 rad of a joint limit, and at every
reset, the solve pulls the redundant posture toward the home posture in the null space first (without it the
least-squares steps walk the elbow into a limit over an episode), so every episode also starts in the same
posture. The joint targets then follow a smoothstep from the current joints to the solution over the same 36
physics steps as the floating gripper's constraint, with the smoothstep's joint velocities as the motors' velocity
targets (BulletArm's low position gains alone would lag far behind), then hold for the same 8 settling steps. One
refinement solve from the reached joints corrects the few tenths of a millimetre a joint-space path leaves. The
gripper's yaw is defined modulo pi (two identical fingers): a yaw target whose solution would pass a joint limit
is turned by pi, as a wrist near its stop would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pybullet as pb

ROBOTS = ("floating", "kuka", "panda")
ATTACH_FORCE = 5000.0  # N: the weld between flange and gripper; contacts never break it
LIMIT_MARGIN = 0.05  # rad: IK solutions closer than this to a joint limit count as out of reach
POSTURE_MARGIN = 0.3  # rad: a move that ends closer than this to a limit re-solves with the posture pulled home


@dataclass(frozen=True)
class ArmSpec:
    """One arm: its model, where it stands and how its motors are driven."""

    name: str
    model: str  # in pybullet_data
    base_distance: float  # m from the workspace centre to the base, along -x
    flange: int  # link the gripper is welded to
    tip: float  # m from the flange along its axis to the gripper position (the fingertips' midpoint)
    replaced_links: tuple  # the arm's own hand: kept as a load, not collided with, not moved
    home: tuple  # joint angles the IK starts from at a reset and the null space pulls toward
    max_force: float  # N m per arm joint (BulletArm's)
    position_gain: float  # BulletArm's
    velocity_gain: float = 1.0  # BulletArm's
    closed_form: bool = False  # a top-down pose in closed form first (joints 2, 4, 6 pitch in one plane)


ARMS = {
    # BulletArm's Kuka stands 0.65 m from the workspace centre (its base at x = -0.2, the workspace centred at
    # x = 0.45); the model's base frame sits 0.1 m ahead of the position given, so the shoulder is 0.55 m away. The
    # elbow's 120 degree limit keeps the wrist at least 0.43 m from the shoulder and the links at most 0.82 m, so
    # there the 0.05-0.1 m strip of the 0.4 m workspace nearest the base is out of reach pointing down. 0.71 m
    # moves the reachable band over the workspace (benchmarks/manipulation_arms.py's reach part). tip: the WSG-50 it
    # replaces reaches 0.29 m past the flange frame, a compact hand 0.15; 0.2 reached the most of the three.
    "kuka": ArmSpec("kuka", "kuka_iiwa/kuka_with_gripper2.sdf", 0.71, flange=6, tip=0.2,
                    replaced_links=tuple(range(7, 14)), home=(0.0, 0.0, 0.0, math.pi / 2, 0.0, -math.pi * 0.33, 0.0),
                    max_force=200.0, position_gain=0.02, closed_form=True),
    # BulletArm's Panda on pybullet_data's model: base at x = -0.1 with the workspace centred at x = 0.45; tip: where
    # the Panda's own fingertips end.
    "panda": ArmSpec("panda", "franka_panda/panda.urdf", 0.55, flange=7, tip=0.116,
                     replaced_links=(8, 9, 10, 11), home=(-0.60, -0.14, 0.59, -2.40, 0.11, 2.28, -1.0),
                     max_force=240.0, position_gain=0.02),
}
ARM_JOINTS = tuple(range(7))
FLIP = (1.0, 0.0, 0.0, 0.0)  # half a turn about x: the flange's axis points down, the gripper's z up


def smoothstep(progress: float) -> tuple[float, float]:
    """The smoothstep s(u) = 3u^2 - 2u^3 and its derivative ds/du."""
    return progress * progress * (3 - 2 * progress), 6 * progress * (1 - progress)


class Arm:
    """One arm in one simulation, carrying the gripper body `gripper`; made with each new simulation (a soft reset
    keeps it, scene.py)."""

    def __init__(self, sim, spec: ArmSpec, gripper: int):
        self.sim, self.spec, self.gripper = sim, spec, gripper
        base = (-spec.base_distance, 0.0, 0.0)
        if spec.model.endswith(".sdf"):
            self.body = sim.loadSDF(spec.model)[0]
            sim.resetBasePositionAndOrientation(self.body, base, (0, 0, 0, 1))
        else:
            self.body = sim.loadURDF(spec.model, base, useFixedBase=True)
        infos = [sim.getJointInfo(self.body, j) for j in ARM_JOINTS]
        self.lower = np.array([info[8] for info in infos])
        self.upper = np.array([info[9] for info in infos])
        for link in range(-1, sim.getNumJoints(self.body)):
            # No joint damping of pybullet's own: the motors' gains alone shape the motion, as in BulletArm.
            sim.changeDynamics(self.body, link, linearDamping=0.0, angularDamping=0.0)
        for link in spec.replaced_links:
            sim.setCollisionFilterGroupMask(self.body, link, 0, 0)
            sim.changeVisualShape(self.body, link, rgbaColor=(0, 0, 0, 0))
            if sim.getJointInfo(self.body, link)[2] != pb.JOINT_FIXED:
                sim.setJointMotorControl2(self.body, link, pb.POSITION_CONTROL, targetPosition=0.0, force=50.0)
        for link in range(-1, sim.getNumJoints(self.body)):
            for gripper_link in (-1, 0, 1):
                sim.setCollisionFilterPair(self.body, gripper, link, gripper_link, 0)
        # A constraint's frames are given in the links' centre-of-mass frames, not in the link frames IK solves for.
        inertial_position, inertial_orientation = sim.getDynamicsInfo(self.body, spec.flange)[3:5]
        to_com = pb.invertTransform(inertial_position, inertial_orientation)
        weld_position, weld_orientation = pb.multiplyTransforms(*to_com, (0, 0, spec.tip), FLIP)
        self.attachment = sim.createConstraint(self.body, spec.flange, gripper, -1, pb.JOINT_FIXED, (0, 0, 0),
                                               weld_position, (0, 0, 0), weld_orientation)
        sim.changeConstraint(self.attachment, maxForce=ATTACH_FORCE)
        self.targets = np.array(spec.home)
        self._from_world = pb.invertTransform(*sim.getBasePositionAndOrientation(self.body))
        movable = [j for j in range(sim.getNumJoints(self.body)) if sim.getJointInfo(self.body, j)[2] != pb.JOINT_FIXED]
        self._held = [0.0] * (len(movable) - len(ARM_JOINTS))  # the replaced hand's joints, held at 0
        extra = len(self._held)  # a zero range would void pybullet's null space: give them a nominal one
        self._limits = ([*self.lower, *[-1.0] * extra], [*self.upper, *[1.0] * extra],
                        [*(self.upper - self.lower), *[2.0] * extra], [*spec.home, *[0.0] * extra])
        if spec.closed_form:
            self._measure_planar_chain()

    def _measure_planar_chain(self):
        """The lengths of a pointing-down Kuka's planar chain, read off the model with every joint at zero (the
        links then stand in one vertical line): shoulder (joint 2) -> elbow (joint 4) -> wrist (joint 6) -> flange,
        and how the gripper's yaw follows joints 1 and 7 once the chain points down."""
        sim = self.sim
        for joint in ARM_JOINTS:
            sim.resetJointState(self.body, joint, 0.0, 0.0)
        shoulder, elbow, wrist, flange = (np.array(sim.getLinkState(self.body, link, computeForwardKinematics=1)[4])
                                          for link in (1, 3, 5, self.spec.flange))
        self.shoulder = shoulder
        self.upper_arm, self.forearm = float(np.linalg.norm(elbow - shoulder)), float(np.linalg.norm(wrist - elbow))
        self.wrist_to_tip = float(np.linalg.norm(flange - wrist)) + self.spec.tip
        longest_bend = self.upper[3] - LIMIT_MARGIN  # the elbow's limit sets how close the wrist comes
        self.reach_range = (math.sqrt(self.upper_arm ** 2 + self.forearm ** 2
                                      + 2 * self.upper_arm * self.forearm * math.cos(longest_bend)),
                            self.upper_arm + self.forearm - 1e-4)
        # Gripper yaw = yaw_offset + joint 1 + yaw_sign * joint 7 (the flange's axis points down, so joint 7 may turn
        # the yaw backwards): two readings of a pointing-down pose give both numbers.
        yaws = []
        for last in (0.0, 0.5):
            joints = self._planar(np.array([self.shoulder[0] + 0.6, 0.0, 0.1]), 0.0, offset=(0.0, 1.0))[0]
            joints[6] = last
            for joint, angle in zip(ARM_JOINTS, joints):
                sim.resetJointState(self.body, joint, float(angle), 0.0)
            orientation = sim.getLinkState(self.body, self.spec.flange, computeForwardKinematics=1)[5]
            unflip = pb.invertTransform((0, 0, 0), FLIP)[1]
            gripper = pb.multiplyTransforms((0, 0, 0), orientation, (0, 0, 0), unflip)[1]
            yaws.append(2 * math.atan2(gripper[2], gripper[3]))
        self.yaw_sign = 1.0 if math.remainder(yaws[1] - yaws[0], 2 * math.pi) > 0 else -1.0
        self.yaw_offset = yaws[0]

    def _planar(self, position, yaw: float, last_joint: float | None = None, offset=None) -> tuple:
        """Closed-form joints that point the gripper straight down at `position` with `yaw`: joint 1 turns the
        chain toward the wrist, joints 2, 4 and 6 solve the two-link triangle elbow up (joints 3 and 5 stay at 0) and
        tilt the flange back to vertical, joint 7 sets the yaw (of the yaw, yaw + pi, ... the one in range nearest
        `last_joint`). A wrist out of reach is put as far along its line from the shoulder as the arm goes.
        Returns the joints, the yaw they give and whether the pose is within reach."""
        yaw_offset, yaw_sign = offset if offset is not None else (self.yaw_offset, self.yaw_sign)
        dx, dy, dz = np.asarray(position, dtype=float) + (0.0, 0.0, self.wrist_to_tip) - self.shoulder
        across = math.hypot(dx, dy)
        distance = math.hypot(across, dz)
        reach = min(max(distance, self.reach_range[0]), self.reach_range[1])
        upper, fore = self.upper_arm, self.forearm
        bend = math.pi - math.acos((upper ** 2 + fore ** 2 - reach ** 2) / (2 * upper * fore))
        lean = math.atan2(across, dz) - math.acos((upper ** 2 + reach ** 2 - fore ** 2) / (2 * upper * reach))
        turn = math.atan2(dy, dx)
        # j2 leans the chain toward +x, j4 bends it the other way for positive angles, j6 like j2 (measured).
        wrist = yaw_sign * (yaw - yaw_offset - turn)
        if last_joint is not None:  # two identical fingers: turning by pi gives the same grasp
            candidates = [wrist + k * math.pi for k in range(-3, 4)]
            inside = [c for c in candidates if self.lower[6] + LIMIT_MARGIN <= c <= self.upper[6] - LIMIT_MARGIN]
            wrist = min(inside or candidates, key=lambda c: abs(c - last_joint))
        realised = yaw_offset + turn + yaw_sign * wrist
        realised = yaw + round((realised - yaw) / math.pi) * math.pi
        return np.array([turn, lean, 0.0, -bend, 0.0, math.pi - lean - bend, wrist]), realised, reach == distance

    # ---- copies: the simulation is rebuilt by the env's replay, which creates a new Arm ----
    def __getstate__(self):
        return {**self.__dict__, "sim": None}

    # ---- kinematics ----
    def flange_target(self, position, yaw: float) -> tuple[list, list]:
        """Flange pose that puts the gripper at `position` with `yaw` (the flange sits `tip` above, pointing down)."""
        orientation = pb.multiplyTransforms((0, 0, 0), (0, 0, math.sin(yaw / 2), math.cos(yaw / 2)),
                                            (0, 0, 0), FLIP)[1]
        return [float(position[0]), float(position[1]), float(position[2]) + self.spec.tip], list(orientation)

    def joints(self) -> np.ndarray:
        return np.array([state[0] for state in self.sim.getJointStates(self.body, ARM_JOINTS)])

    def solve(self, position, yaw: float, seed=None, rounds: int = 3, posture: bool = False) -> np.ndarray:
        """Joint angles that put the gripper at the pose, from `seed` (default: the current joints). pybullet's
        solver stops after a few Newton steps; each round restarts it from the last answer (given as
        `currentPositions`, which also makes it read the target in the base's centre-of-mass frame). A move takes
        the damped least-squares step (the smallest joint change: a zero action leaves the arm still); `posture`
        (a reset) pulls the null space toward the home posture first, then lands on the pose with a plain round."""
        joints = self.joints() if seed is None else np.asarray(seed, dtype=float)
        if self.spec.closed_form:
            return self._closed_form(position, yaw, joints)[0]
        flange_position, flange_orientation = self.flange_target(position, yaw)
        local, local_orientation = pb.multiplyTransforms(*self._from_world, flange_position, flange_orientation)
        for round_ in range(rounds):
            null_space = {}
            if posture and round_ < rounds - 1:
                null_space = dict(lowerLimits=self._limits[0], upperLimits=self._limits[1],
                                  jointRanges=self._limits[2], restPoses=self._limits[3])
            solution = self.sim.calculateInverseKinematics(
                self.body, self.spec.flange, local, local_orientation, currentPositions=[*joints, *self._held],
                maxNumIterations=20, residualThreshold=1e-6, **null_space)
            joints = np.array(solution[:len(ARM_JOINTS)])
        return joints

    def _closed_form(self, position, yaw: float, seed: np.ndarray) -> tuple[np.ndarray, float]:
        """The closed-form posture (the arm's posture is a function of the gripper pose, so no drift over an
        episode), polished by one round of pybullet's solver where the pose is within reach."""
        joints, realised, within_reach = self._planar(position, yaw, last_joint=seed[6])
        if within_reach:
            flange_position, flange_orientation = self.flange_target(position, realised)
            local, local_orientation = pb.multiplyTransforms(*self._from_world, flange_position, flange_orientation)
            joints = np.array(self.sim.calculateInverseKinematics(
                self.body, self.spec.flange, local, local_orientation, currentPositions=[*joints, *self._held],
                maxNumIterations=20, residualThreshold=1e-6)[:len(ARM_JOINTS)])
        return joints, realised

    def within_limits(self, joints: np.ndarray, margin: float = LIMIT_MARGIN) -> bool:
        return bool(np.all(joints >= self.lower + margin) and np.all(joints <= self.upper - margin))

    def solve_reachable(self, position, yaw: float, seed=None, posture: bool = False) -> tuple[np.ndarray, float]:
        """A solution and the yaw it realises. The smallest joint change first; where that ends near a joint limit
        (within POSTURE_MARGIN), the solve that pulls the posture home (left alone, the damped least-squares steps
        walk the elbow into a limit over an episode); then `yaw` turned by pi where that keeps every joint in range."""
        if self.spec.closed_form:
            return self._closed_form(position, yaw, self.joints() if seed is None else np.asarray(seed, dtype=float))
        joints = self.solve(position, yaw, seed, posture=posture)
        if not posture and not self.within_limits(joints, POSTURE_MARGIN):
            joints = self.solve(position, yaw, seed, posture=True)
        if self.within_limits(joints):
            return joints, yaw
        for turned in (yaw - math.pi, yaw + math.pi):
            other = self.solve(position, turned, seed, posture=True)
            if self.within_limits(other):
                return other, turned
        return joints, yaw

    def place(self, position, yaw: float):
        """Put the arm, at rest, where the gripper (already placed by the env) is: IK from the home posture, so a
        reset or a scene state gives the same joints whatever the arm did before."""
        sim = self.sim
        for joint, angle in zip(ARM_JOINTS, self.spec.home):
            sim.resetJointState(self.body, joint, angle, 0.0)
        for link in self.spec.replaced_links:
            if sim.getJointInfo(self.body, link)[2] != pb.JOINT_FIXED:
                sim.resetJointState(self.body, link, 0.0, 0.0)
        joints, realised = self.solve_reachable(position, yaw, seed=self.spec.home, posture=True)
        if realised != yaw:  # the same gripper pose for two identical fingers, within the wrist's reach
            sim.resetBasePositionAndOrientation(self.gripper, list(position),
                                                (0, 0, math.sin(realised / 2), math.cos(realised / 2)))
        joints = self.solve(position, realised, seed=joints, rounds=8, posture=True)
        for joint, angle in zip(ARM_JOINTS, joints):
            sim.resetJointState(self.body, joint, float(angle), 0.0)
        self.targets = joints
        self._drive(joints, np.zeros(len(ARM_JOINTS)))

    def _drive(self, positions, velocities):
        count = len(ARM_JOINTS)
        self.sim.setJointMotorControlArray(
            self.body, ARM_JOINTS, pb.POSITION_CONTROL, targetPositions=list(positions),
            targetVelocities=list(velocities), forces=[self.spec.max_force] * count,
            positionGains=[self.spec.position_gain] * count, velocityGains=[self.spec.velocity_gain] * count)

    def move(self, target, target_yaw: float, move_steps: int, settle_steps: int, time_step: float, physics_step):
        """Drive the joints along a smoothstep to the IK solution of the target pose, then hold and refine."""
        start = self.joints()
        goal, target_yaw = self.solve_reachable(target, target_yaw)
        for i in range(1, move_steps + 1):
            fraction, rate = smoothstep(i / move_steps)
            self._drive(start + fraction * (goal - start), rate / (move_steps * time_step) * (goal - start))
            physics_step()
        # The joint-space path ends where the solve said; one more solve from there removes what is left.
        goal = self.solve(target, target_yaw)
        self.targets = goal
        self._drive(goal, np.zeros(len(ARM_JOINTS)))
        for _ in range(settle_steps):
            physics_step()

    def record(self) -> list:
        """The arm's joint states and motor targets, for the env's exact-copy check."""
        return [state[:2] for state in self.sim.getJointStates(self.body, range(self.sim.getNumJoints(self.body)))] \
            + [tuple(self.targets)]


def make_arm(sim, robot: str, gripper: int) -> Arm | None:
    """The arm that carries `gripper` (None for the floating gripper)."""
    return None if robot == "floating" else Arm(sim, ARMS[robot], gripper)
