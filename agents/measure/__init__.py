"""Tools that measure live experts over the bus: their cost per step (profiler, for SMO's
profiles) and their scores of known answers (collect, for training the gating)."""
