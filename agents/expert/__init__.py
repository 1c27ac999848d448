"""The expert role: one model on the bus (agent), its settings (config), scoring and warm-up,
the model backends, model files and energy meters."""
