"""The transformer as units (docs/CONTRACTS.md): configs, units, paged attention, weights, sampling, oracle."""

from flexpipe.model.attention import AttnMetadata, PagedKVCache, paged_attention
from flexpipe.model.checkpoint import CheckpointReader, PresetWeights, save_checkpoint
from flexpipe.model.config import PRESETS, ModelConfig, preset
from flexpipe.model.reference import ReferenceModel, generate
from flexpipe.model.sampling import SamplingParams, sample
from flexpipe.model.tokenizer import ByteTokenizer, HFTokenizer, StreamDecoder, load_tokenizer
from flexpipe.model.units import (
    MLP, Attention, Embedding, Head, Unit, UnitCost, build_units, make_kv_caches, run_units, tensor_names,
    unit_costs,
)

__all__ = [
    "AttnMetadata", "PagedKVCache", "paged_attention", "CheckpointReader", "PresetWeights", "save_checkpoint",
    "PRESETS", "ModelConfig", "preset", "ReferenceModel", "generate", "SamplingParams", "sample",
    "ByteTokenizer", "HFTokenizer", "StreamDecoder", "load_tokenizer", "MLP", "Attention", "Embedding", "Head",
    "Unit", "UnitCost", "build_units", "make_kv_caches", "run_units", "tensor_names", "unit_costs",
]
