"""Profiling: building latency profiles (DESIGN.md section 5). `llmservingsim` imports
LLMServingSim's layer-wise vLLM measurements into a `dlora-profile/1` document; `known` holds
the model shapes and GPU facts an import needs when the source does not carry them. The
measuring profiler (`dlora profile`, today in `dlora.exec.profiler`) is planned to move here.
Nothing in this package imports torch."""
