"""LLMServingSim's profile files read into a `Source` (`dlora profile import llmservingsim DIR`;
`llmservingsim.py`'s module docstring says what DIR holds and how the profile is composed from
it): meta.yaml and one `tp<N>/` folder's dense.csv, attention.csv, per_sequence.csv and the
optional skew.csv, every time in seconds, every bad file a `ProfileError` naming the file and
line. No torch here."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..errors import ProfileError

REQUIRED_OPS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "layernorm", "embedding")


@dataclass(frozen=True, slots=True)
class Source:
    """The parsed files of one tensor-parallel degree (seconds)."""

    folder: Path
    meta: dict[str, Any]
    tp: int
    dense: dict[str, dict[int, float]]  # op -> tokens -> seconds (one layer, one rank)
    attention: np.ndarray  # rows: prefill_chunk, kv_prefill, n_decode, kv_decode, seconds
    per_sequence: dict[str, dict[int, float]]  # lm_head / sampler -> sequences -> seconds
    skew: dict[str, np.ndarray] | None = None  # regime -> rows t_mean, t_max, t_skew (optional skew.csv)

    @property
    def files(self) -> tuple[Path, ...]:
        d = self.folder / f"tp{self.tp}"
        return (self.folder / "meta.yaml", d / "dense.csv", d / "attention.csv", d / "per_sequence.csv")


def _rows(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise ProfileError(f"llmservingsim: {path}: no such file")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        have = reader.fieldnames or []
        missing = [c for c in columns if c not in have]
        if missing:
            raise ProfileError(f"llmservingsim: {path}: missing column(s) {', '.join(missing)} "
                               f"(has: {', '.join(have) or 'none'})")
        rows = [r for r in reader if r.get(columns[0]) != columns[0]]  # repeated headers
    if not rows:
        raise ProfileError(f"llmservingsim: {path}: no rows")
    return rows


def _number(path: Path, line: int, row: dict[str, str], col: str) -> float:
    try:
        x = float(row[col])
    except (TypeError, ValueError):
        raise ProfileError(f"llmservingsim: {path}: line {line}: {col} {row[col]!r} is not a number") from None
    if not np.isfinite(x) or x < 0:
        raise ProfileError(f"llmservingsim: {path}: line {line}: {col} {row[col]!r} must be >= 0")
    return x


def _by_name(path: Path, key: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for i, r in enumerate(_rows(path, ("layer", key, "time_us")), start=2):
        out.setdefault(r["layer"], {})[int(_number(path, i, r, key))] = _number(path, i, r, "time_us") * 1e-6
    return out


def read_source(folder: Path, tp: int | None = None) -> Source:
    """Parse DIR (see the module docstring); `tp` None picks the smallest degree there."""
    meta_path = folder / "meta.yaml"
    if not meta_path.is_file():
        raise ProfileError(f"llmservingsim: {folder}: no meta.yaml (give the folder holding meta.yaml "
                           "and tp*/, e.g. profiler/perf/RTXPRO6000/meta-llama/Llama-3.1-8B/bf16)")
    try:
        meta = yaml.safe_load(meta_path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"llmservingsim: {meta_path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(meta, dict):
        raise ProfileError(f"llmservingsim: {meta_path}: must be a mapping")
    for key in ("model", "hardware"):
        if not isinstance(meta.get(key), str):
            raise ProfileError(f"llmservingsim: {meta_path}: missing {key!r}")
    have = sorted(int(p.name[2:]) for p in folder.glob("tp*") if p.is_dir() and p.name[2:].isdigit())
    if not have:
        raise ProfileError(f"llmservingsim: {folder}: no tp<N>/ folder")
    tp = have[0] if tp is None else tp
    if tp not in have:
        raise ProfileError(f"llmservingsim: {folder}: no tp{tp}/ (available: --tp "
                           f"{' | '.join(str(t) for t in have)})")
    d = folder / f"tp{tp}"
    dense = _by_name(d / "dense.csv", "tokens")
    missing = [op for op in REQUIRED_OPS if op not in dense]
    if missing:
        raise ProfileError(f"llmservingsim: {d / 'dense.csv'}: no rows for {', '.join(missing)} "
                           "(a dense decoder layer is expected)")
    path = d / "attention.csv"
    cols = ("prefill_chunk", "kv_prefill", "n_decode", "kv_decode", "time_us")
    att = np.array([[_number(path, i, r, c) for c in cols] for i, r in enumerate(_rows(path, cols), 2)])
    att[:, 4] *= 1e-6
    per_seq = _by_name(d / "per_sequence.csv", "sequences")
    for op in ("lm_head", "sampler"):
        if op not in per_seq:
            raise ProfileError(f"llmservingsim: {d / 'per_sequence.csv'}: no rows for {op}")
    return Source(folder, meta, tp, dense, att, per_seq, _read_skew(d / "skew.csv"))


def _read_skew(path: Path) -> dict[str, np.ndarray] | None:
    """skew.csv (optional): per regime (pure decode, mixed) the times of a batch at its mean
    context, at its longest context, and as measured with unequal contexts."""
    if not path.is_file():
        return None
    cols = ("regime", "t_mean_us", "t_max_us", "t_skew_us")
    out: dict[str, list[list[float]]] = {}
    for i, r in enumerate(_rows(path, cols), 2):
        if not all(r[c] for c in cols[1:]):
            continue  # a point the profiler could not measure
        out.setdefault(r["regime"], []).append([_number(path, i, r, c) * 1e-6 for c in cols[1:]])
    return {k: np.array(v) for k, v in out.items()}
