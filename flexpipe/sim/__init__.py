"""Cluster-scale simulator: FlexPipe's placement and planning code driven by a discrete-event clock.

engine (events, replicas, actions), perf (GPU roofline + calibration), traces (readers, generators),
cluster (GPUs, occupancy, placement), policy (FlexPipe's planning adapter), baselines, report,
scenarios (named presets), cli (`flexpipe simulate`).
"""

from flexpipe.sim.engine import ModelSpec, Simulator

__all__ = ["ModelSpec", "Simulator"]
