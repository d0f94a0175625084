"""Training objectives: `objective(model, batch) -> (loss_sum, count, metrics)`, one family's loss per module."""
