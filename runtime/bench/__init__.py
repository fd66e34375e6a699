"""Tools built on the runtime: the per-mode benchmark, the load benchmark, auto's cost calibration."""
