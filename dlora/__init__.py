"""dlora: serve and simulate many LoRA adapters of one base LLM (dLoRA, OSDI'24)."""

__version__ = "0.1.0"
