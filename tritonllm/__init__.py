"""tritonllm: Hugging Face causal LM -> measured NVIDIA Triton deployment."""

__version__ = "0.1.0"
