"""Training: optimizer (AdamW, schedule, layer-wise LR decay, freezing), loss, train step, state, checkpoints."""
