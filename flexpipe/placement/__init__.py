"""Topology- and fragmentation-aware GPU placement: cluster descriptions, fragmentation, the placer."""

from flexpipe.placement.fragmentation import (WorkloadMix, delta_if_placed, fragmentation, fragmentation_ratio,
                                              placement_delta)
from flexpipe.placement.placer import (PLACERS, BestFitPlacer, CostModel, FirstFitPlacer, FlexPlacer, Placement,
                                       RandomPlacer, ReplicaRequest, StagePlacement, UnitDemand, check_placement,
                                       evaluate, even_boundaries, ideal_time, make_placer, mix_for,
                                       request_for_model, reservation_delta)
from flexpipe.placement.topology import (DEFAULT_LINKS, GPU, GPU_MODELS, Link, LinkKind, Node,
                                         OccupancyProfile, Topology, discover_local, format_table, fragment,
                                         load_cluster, make_gpu, paper_testbed, synthetic_cluster)

__all__ = [
    "WorkloadMix", "delta_if_placed", "fragmentation", "fragmentation_ratio", "placement_delta",
    "PLACERS", "BestFitPlacer", "CostModel", "FirstFitPlacer", "FlexPlacer", "Placement", "RandomPlacer",
    "ReplicaRequest", "StagePlacement", "UnitDemand", "check_placement", "evaluate", "even_boundaries",
    "ideal_time", "make_placer", "mix_for", "request_for_model", "reservation_delta",
    "DEFAULT_LINKS", "GPU", "GPU_MODELS", "Link", "LinkKind", "Node", "OccupancyProfile", "Topology",
    "discover_local", "format_table", "fragment", "load_cluster", "make_gpu", "paper_testbed", "synthetic_cluster",
]
