"""Training: the run setup, the train state and its stages, the loop, the optimiser, metrics logging."""
