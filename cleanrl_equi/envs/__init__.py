"""Environment construction: Atari back-ends and their mirror symmetries (`atari`), MuJoCo helpers (`mujoco`), and
the pybullet manipulation task suite with its vector envs, evaluation and batch rotation (`manipulation`)."""
