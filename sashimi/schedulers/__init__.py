"""Time and noise processes of the flow families, one per file (diffusers-style): set_timesteps, step(model_output, t, sample)."""
