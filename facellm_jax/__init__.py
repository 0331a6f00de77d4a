"""FaceLLM-JAX: InternVL3 in Flax NNX for face understanding."""

__version__ = "0.1.0"
