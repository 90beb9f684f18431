"""When and how to reshape: traffic analysis, a performance model, and the granularity policy.

Pure, clock-agnostic library code: every update takes the time `now`, so the live control loop and
the discrete-event simulator drive the same objects.

    an = TrafficAnalyzer()
    policy = GranularityPolicy(PolicyConfig(), AnalyticPerfModel(unit_costs(cfg), GpuSpec.preset("A100-80")))
    an.on_arrival(now, prompt_tokens)            # per event (also on_queue, on_tokens, on_finish)
    decision = policy.decide(now, an.snapshot(now), current)   # per tick, and when on_* returns True
"""

from flexpipe.planning.analyzer import Dist, TrafficAnalyzer, TrafficStats
from flexpipe.planning.perfmodel import AnalyticPerfModel, GpuSpec, LinkSpec, PerfModel
from flexpipe.planning.policy import (Action, Candidate, Decision, GranularityPolicy, PipelineConfig,
                                      PolicyConfig)

__all__ = ["Action", "AnalyticPerfModel", "Candidate", "Decision", "Dist", "GpuSpec", "GranularityPolicy",
           "LinkSpec", "PerfModel", "PipelineConfig", "PolicyConfig", "TrafficAnalyzer", "TrafficStats"]
