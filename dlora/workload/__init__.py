"""Workloads (DESIGN.md section 2): arrivals x adapter popularity x lengths, synthetic or from
traces; the same requests feed the simulator and the live driver.

- `config`: the scenario's `workload:` section (`WorkloadConfig` and its parts).
- `traces`: loaders for request traces, length tables and Azure Functions traces.
- `generate`: vectorised draws (Gamma streams, power-law shares, dLoRA's function-to-adapter
  stride mapping of PAPER.md section 7, lengths).
- `build`: `build_requests(cfg, adapter_names, rng, base_dir)` -> sorted `Request`s.
"""

from __future__ import annotations

from .build import build_requests, check_workload, resolve_path
from .config import (
    ARRIVAL_KINDS,
    FUNCTION_FORMATS,
    LENGTH_KINDS,
    POPULARITY_KINDS,
    TRACE_FORMATS,
    ArrivalConfig,
    LengthsConfig,
    PopularityConfig,
    WorkloadConfig,
)
from .generate import function_shares, merged_gamma_streams, power_law_shares, sample_lengths
from .traces import (
    FunctionTrace,
    LengthsTable,
    RequestTrace,
    load_azure_functions_2019,
    load_azure_functions_2021,
    load_azure_llm_trace,
    load_function_trace,
    load_generic_trace,
    load_lengths_table,
    load_request_trace,
)

__all__ = [
    "ARRIVAL_KINDS",
    "FUNCTION_FORMATS",
    "LENGTH_KINDS",
    "POPULARITY_KINDS",
    "TRACE_FORMATS",
    "ArrivalConfig",
    "FunctionTrace",
    "LengthsConfig",
    "LengthsTable",
    "PopularityConfig",
    "RequestTrace",
    "WorkloadConfig",
    "build_requests",
    "check_workload",
    "function_shares",
    "load_azure_functions_2019",
    "load_azure_functions_2021",
    "load_azure_llm_trace",
    "load_function_trace",
    "load_generic_trace",
    "load_lengths_table",
    "load_request_trace",
    "merged_gamma_streams",
    "power_law_shares",
    "resolve_path",
    "sample_lengths",
]
