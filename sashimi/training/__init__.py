"""The training runtime shared by every family: the loop, checkpoints, LR schedule, processes, evaluation."""
