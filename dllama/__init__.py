"""dllama: distributed LLM inference on ordinary computers."""
__version__ = "0.1.0"
