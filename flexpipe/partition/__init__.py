"""The unit graph and its cuts: pipeline shapes and the balanced-partition solver."""

from flexpipe.partition.graph import PipelineShape, StageSpec, UnitGraph, UnitNode, check_shape_numbers
from flexpipe.partition.solver import CostModel, Partition, even_boundaries, parse_bytes, solve

__all__ = ["CostModel", "Partition", "PipelineShape", "StageSpec", "UnitGraph", "UnitNode",
           "check_shape_numbers", "even_boundaries", "parse_bytes", "solve"]
