"""The simulator: the core on virtual time (SimPy), with the profiled executor."""
