"""How smooth and how gentle a manipulation episode was: every metric defined once, with its unit.

The physics metrics are sampled by the env at every physics step (1/240 s), not once per env step, so short peaks
(a strike, an impact) are not missed. Every env returns the episode's values so far in `info` at reset and at every
step (0-d float arrays, so vector envs stack them), which makes the values in the last step's `info` the episode's.
Scripts average them over evaluation episodes and log `eval/<name>`; datasets keep them per episode.

Action (from the normalised actions a_t in [-1, 1]^5 the env executed):
    action_smoothness     CAPS's Sm (Mysore et al. 2021): the amplitude-weighted mean frequency of the actions'
                          spectrum, 2 / (n f_s) sum_i M_i f_i with f_s = 1 per step, averaged over the 5 dimensions.
                          0 for a constant sequence, larger for high-frequency jitter. Unitless.
    action_change         mean over steps of |a_t - a_t-1| (Euclidean). Unitless.
Gripper motion (the palm's centre of mass, from the simulator's velocity v(t)):
    path_length           integral of |v| dt, in m.
    peak_speed            max |v|, in m/s.
    mean_squared_jerk     mean over physics steps of |d^2 v / dt^2|^2 (second differences of v at 240 Hz), in
                          m^2/s^6; 0 for a still gripper.
Contact (normal forces reported by the solver; `task bodies` are the task's objects, fixtures included):
    peak_grip_force       max over physics steps of the summed normal force between the gripper and any task body,
                          in N (pressing, squeezing and striking all show here).
    mean_grip_force       mean of that sum over the physics steps in which the gripper touches a task body, in N
                          (0 if it never does).
    contact_impulse       integral of that sum over the episode, in N s.
    peak_impact_force     max over physics steps and task bodies of the summed normal force on one task body from
                          the table and the other task bodies, in N. An object at rest contributes its weight
                          (a 5 cm cube of 0.1 kg about 1 N), so impacts are what rises above that.
    peak_object_acceleration   max over physics steps of the acceleration of a free object's centre of mass or of a
                          sliding part (the drawer) along its joint, from first differences of velocity, in m/s^2.
    drops                 how many times a free object fell freely by more than DROP_HEIGHT: it lost every contact
                          (closer than 2 mm) with the gripper, the table and the other bodies, and met one again
                          more than DROP_HEIGHT below the highest point of that flight. A count.

Joint motion (the arm's seven joints, from the simulator's joint states; all 0 for the floating gripper, which has no
joints, so every robot reports the same keys and a vector env or a dataset mixes none):
    joint_path_length     sum over joints of the integral of |dq/dt| dt, in rad.
    peak_joint_speed      max over joints and physics steps of |dq/dt|, in rad/s.
    mean_squared_joint_jerk   mean over physics steps of sum over joints of (d^2 (dq/dt) / dt^2)^2 (second
                          differences of the joint velocities at 240 Hz), in rad^2/s^6; 0 for a still arm.
    peak_joint_torque     max over joints and physics steps of the motor torque pybullet applied, |tau|, in N m.
    rms_joint_torque      root mean square of the applied motor torques over joints and physics steps, in N m
                          (holding the arm up against gravity shows here: it is not 0 for a still arm).
    time_near_joint_limit time during which some joint is within NEAR_LIMIT (0.1 rad) of one of its limits, in s.

The env step just taken (0 at reset; what a per-step cost reads, e.g. constrained SAC's `--cost-kind`):
    step_peak_grip_force  peak_grip_force over the physics steps of this env step only, in N.
    step_peak_impact_force    peak_impact_force over the physics steps of this env step only, in N.
    step_mean_squared_jerk    mean_squared_jerk over the physics steps of this env step only, in m^2/s^6.

Every metric is a norm, a sum of norms, a height or a count, so it does not change when the scene is turned about
the vertical axis: the symmetry tests check that on real episodes.
"""

from __future__ import annotations

import functools
import math

import numpy as np

DROP_HEIGHT = 0.03  # m: a fall from higher than this counts as a drop (release just above a support does not)
TOUCH_DISTANCE = 0.002  # m: pybullet also reports contact points a little apart; closer than this is touching

ACTION_METRICS = ("action_smoothness", "action_change")
JOINT_METRICS = ("joint_path_length", "peak_joint_speed", "mean_squared_joint_jerk", "peak_joint_torque",
                 "rms_joint_torque", "time_near_joint_limit")
PHYSICS_METRICS = ("path_length", "peak_speed", "mean_squared_jerk", "peak_grip_force", "mean_grip_force",
                   "contact_impulse", "peak_impact_force", "peak_object_acceleration", "drops") + JOINT_METRICS
NEAR_LIMIT = 0.1  # rad: a joint this close to a limit counts as near it
EPISODE_METRICS = ACTION_METRICS + PHYSICS_METRICS
STEP_METRICS = ("step_peak_grip_force", "step_peak_impact_force", "step_mean_squared_jerk")  # not episode values
UNITS = {"action_smoothness": "", "action_change": "", "path_length": "m", "peak_speed": "m/s",
         "mean_squared_jerk": "m^2/s^6", "peak_grip_force": "N", "mean_grip_force": "N", "contact_impulse": "N s",
         "peak_impact_force": "N", "peak_object_acceleration": "m/s^2", "drops": "", "joint_path_length": "rad",
         "peak_joint_speed": "rad/s", "mean_squared_joint_jerk": "rad^2/s^6", "peak_joint_torque": "N m",
         "rms_joint_torque": "N m", "time_near_joint_limit": "s", "step_peak_grip_force": "N",
         "step_peak_impact_force": "N", "step_mean_squared_jerk": "m^2/s^6"}


def action_smoothness(actions: np.ndarray) -> float:
    """CAPS's Sm of one episode's actions (T x D): 0 for a constant sequence; see the module docstring."""
    actions = np.asarray(actions, dtype=np.float64)
    if len(actions) < 2:
        return 0.0
    spectrum = np.abs(np.fft.rfft(actions, axis=0))  # (n_freq, D)
    freqs = np.fft.rfftfreq(len(actions))[:, None]
    return float((2.0 / len(freqs) * (spectrum * freqs).sum(0)).mean())


def action_change(actions: np.ndarray) -> float:
    """Mean |a_t - a_t-1| of one episode's actions (T x D); 0 for fewer than two actions."""
    actions = np.asarray(actions, dtype=np.float64)
    if len(actions) < 2:
        return 0.0
    return float(np.linalg.norm(np.diff(actions, axis=0), axis=1).mean())


class PhysicsMetrics:
    """Running physics metrics of one episode, fed one physics step at a time by `sample`.

    Keeps only running sums and maxima (and the last two gripper velocities for the jerk), so memory does not grow
    with the episode. `sample` runs after every physics step, so it is written for speed: pybullet's functions bound
    to the client once, plain floats instead of small numpy arrays (about 4x cheaper here). `step_peak_grip_force`
    is the peak of the env step in progress (reset by `start_step`), which the force penalty reads; the STEP_METRICS
    are that step's values.
    """

    def __init__(self, client_id: int, gripper: int, task_bodies: list[int], free_objects: list[int],
                 sliding: list[int], time_step: float, arm=None):
        import pybullet as pb  # here, so that importing the metrics' definitions does not load pybullet

        self._contacts = functools.partial(pb.getContactPoints, physicsClientId=client_id)
        self._velocity = functools.partial(pb.getBaseVelocity, physicsClientId=client_id)
        self._pose = functools.partial(pb.getBasePositionAndOrientation, physicsClientId=client_id)
        self._joint = functools.partial(pb.getJointState, physicsClientId=client_id)
        self.gripper, self.dt = gripper, time_step
        self.task_bodies = frozenset(task_bodies)
        self.free_objects = tuple(free_objects)
        self.sliding = tuple(sliding)
        self.path_length = self.peak_speed = self.jerk_sum = 0.0
        self.jerk_count = 0
        self.peak_grip_force = self.grip_force_sum = self.contact_impulse = 0.0
        self.grip_steps = 0
        self.peak_impact_force = self.peak_object_acceleration = 0.0
        self.drops = 0
        self.step_peak_grip_force = self.step_peak_impact_force = self.step_jerk_sum = 0.0
        self.step_jerk_count = 0
        self._last_velocities: tuple = ()  # the gripper's velocities at the last two samples
        self._object_velocity: dict[int, tuple] = {}
        self._sliding_velocity: dict[int, float] = {}
        self._flight_top: dict[int, float] = {}  # free objects in the air: the highest z of the flight so far
        # The arm's joints (robots.Arm), if the gripper rides on one.
        self._arm_states = None
        if arm is not None:
            self._arm_states = functools.partial(pb.getJointStates, arm.body, list(range(len(arm.lower))),
                                                 physicsClientId=client_id)
            self._low_band = [float(limit) + NEAR_LIMIT for limit in arm.lower]
            self._high_band = [float(limit) - NEAR_LIMIT for limit in arm.upper]
        self.joint_path_length = self.peak_joint_speed = self.joint_jerk_sum = 0.0
        self.joint_jerk_count = 0
        self.peak_joint_torque = self.joint_torque_square_sum = 0.0
        self.joint_torque_count = 0
        self.time_near_joint_limit = 0.0
        self._last_joint_velocities: tuple = ()

    def start_step(self):
        self.step_peak_grip_force = self.step_peak_impact_force = self.step_jerk_sum = 0.0
        self.step_jerk_count = 0

    def sample(self):
        """Read the simulator once after a physics step."""
        dt = self.dt
        vx, vy, vz = self._velocity(self.gripper)[0]
        speed = math.sqrt(vx * vx + vy * vy + vz * vz)
        self.path_length += speed * dt
        if speed > self.peak_speed:
            self.peak_speed = speed
        last = self._last_velocities
        if len(last) == 2:
            (ax, ay, az), (bx, by, bz) = last
            jx, jy, jz = vx - 2 * bx + ax, vy - 2 * by + ay, vz - 2 * bz + az
            jerk = (jx * jx + jy * jy + jz * jz) / (dt ** 4)
            self.jerk_sum += jerk
            self.jerk_count += 1
            self.step_jerk_sum += jerk
            self.step_jerk_count += 1
            self._last_velocities = (last[1], (vx, vy, vz))
        else:
            self._last_velocities = (*last, (vx, vy, vz))

        grip, support, touched = 0.0, {}, set()
        gripper, bodies = self.gripper, self.task_bodies
        for contact in self._contacts():
            a, b, distance, force = contact[1], contact[2], contact[8], contact[9]
            if distance < TOUCH_DISTANCE:
                touched.add(a)
                touched.add(b)
            if a == gripper or b == gripper:
                if (b if a == gripper else a) in bodies:
                    grip += force
            elif force > 0.0:
                if a in bodies:
                    support[a] = support.get(a, 0.0) + force
                if b in bodies:
                    support[b] = support.get(b, 0.0) + force
        if grip > 0.0:
            if grip > self.step_peak_grip_force:
                self.step_peak_grip_force = grip
                if grip > self.peak_grip_force:
                    self.peak_grip_force = grip
            self.grip_force_sum += grip
            self.grip_steps += 1
            self.contact_impulse += grip * dt
        if support:
            impact = max(support.values())
            if impact > self.step_peak_impact_force:
                self.step_peak_impact_force = impact
                if impact > self.peak_impact_force:
                    self.peak_impact_force = impact

        for body in self.free_objects:
            velocity = self._velocity(body)[0]
            previous = self._object_velocity.get(body)
            if previous is not None:
                dx, dy, dz = velocity[0] - previous[0], velocity[1] - previous[1], velocity[2] - previous[2]
                acceleration = math.sqrt(dx * dx + dy * dy + dz * dz) / dt
                if acceleration > self.peak_object_acceleration:
                    self.peak_object_acceleration = acceleration
            self._object_velocity[body] = velocity
            if body in touched:
                if body in self._flight_top:
                    if self._flight_top.pop(body) - self._pose(body)[0][2] > DROP_HEIGHT:
                        self.drops += 1
            else:
                z = self._pose(body)[0][2]
                self._flight_top[body] = max(self._flight_top.get(body, z), z)
        for body in self.sliding:
            joint_velocity = self._joint(body, 0)[1]
            previous = self._sliding_velocity.get(body)
            if previous is not None:
                self.peak_object_acceleration = max(self.peak_object_acceleration, abs(joint_velocity - previous) / dt)
            self._sliding_velocity[body] = joint_velocity
        if self._arm_states is not None:
            self._sample_joints(dt)

    def _sample_joints(self, dt: float):
        # Plain floats, like `sample`: numpy on seven numbers per physics step cost more than the reading itself.
        states = self._arm_states()
        velocities = tuple(state[1] for state in states)
        speeds = [abs(v) for v in velocities]
        self.joint_path_length += sum(speeds) * dt
        self.peak_joint_speed = max(self.peak_joint_speed, *speeds)
        last = self._last_joint_velocities
        if len(last) == 2:
            self.joint_jerk_sum += sum((v - 2 * b + a) ** 2 for a, b, v in zip(*last, velocities)) / dt ** 4
            self.joint_jerk_count += 1
            self._last_joint_velocities = (last[1], velocities)
        else:
            self._last_joint_velocities = (*last, velocities)
        near = False
        for state, low, high in zip(states, self._low_band, self._high_band):
            torque = state[3]
            self.joint_torque_square_sum += torque * torque
            if abs(torque) > self.peak_joint_torque:
                self.peak_joint_torque = abs(torque)
            near = near or not low <= state[0] <= high
        self.joint_torque_count += len(states)
        if near:
            self.time_near_joint_limit += dt

    def values(self) -> dict[str, float]:
        return {
            "path_length": self.path_length, "peak_speed": self.peak_speed,
            "mean_squared_jerk": self.jerk_sum / self.jerk_count if self.jerk_count else 0.0,
            "peak_grip_force": self.peak_grip_force,
            "mean_grip_force": self.grip_force_sum / self.grip_steps if self.grip_steps else 0.0,
            "contact_impulse": self.contact_impulse, "peak_impact_force": self.peak_impact_force,
            "peak_object_acceleration": self.peak_object_acceleration, "drops": float(self.drops),
            "joint_path_length": self.joint_path_length, "peak_joint_speed": self.peak_joint_speed,
            "mean_squared_joint_jerk": self.joint_jerk_sum / self.joint_jerk_count if self.joint_jerk_count else 0.0,
            "peak_joint_torque": self.peak_joint_torque,
            "rms_joint_torque": math.sqrt(self.joint_torque_square_sum / self.joint_torque_count)
            if self.joint_torque_count else 0.0,
            "time_near_joint_limit": self.time_near_joint_limit,
            "step_peak_grip_force": self.step_peak_grip_force, "step_peak_impact_force": self.step_peak_impact_force,
            "step_mean_squared_jerk": self.step_jerk_sum / self.step_jerk_count if self.step_jerk_count else 0.0,
        }
