"""Training engine for the FcaNet reproduction: configs, data, schedules, checkpoints, train/eval loops."""
