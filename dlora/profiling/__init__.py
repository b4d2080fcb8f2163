"""Profiling: building latency profiles (DESIGN.md section 5), by role.

Measuring (`dlora profile`; these import torch): `setup` (the model, the device, its memory),
`measure` (the sweep through the TorchExecutor, switch / transfer / scheduler timings),
`assemble` (the profile document and its provenance). Torch-free: `sweep` (the grid and its
held-out points), `fit` (every fit, measured and imported), `llmservingsim` (imports
LLMServingSim's layer-wise vLLM measurements into a `dlora-profile/1` document) and `known`
(model shapes and GPU facts an import needs when the source does not carry them), so
`dlora profile import llmservingsim` runs without torch."""
