"""FlexPipe: LLM serving as a pipeline of fine-grained stages, reshaped while requests run."""

__version__ = "0.1.0"
