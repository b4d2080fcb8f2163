"""Trace and table loaders: request traces (Azure LLM inference 2023, generic CSV), length
tables (the `num_prefill_tokens,num_decode_tokens,...` format of Vidur's tables), and Azure
Functions invocation traces (2019 per-minute counts, 2021 per-invocation rows) for dLoRA's
function-to-adapter mapping (PAPER.md section 7).

Loaders parse by hand (no pandas) and raise `WorkloadError` naming the file and line (also for
times that are negative, NaN or infinite, and token counts that are negative or not numbers);
the workload builder turns that into a `ConfigError` naming the key path.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import WorkloadError

AZURE_LLM_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
GENERIC_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")


@dataclass(frozen=True, slots=True, eq=False)
class RequestTrace:
    """Requests of a trace, sorted by arrival. `adapters` holds the generic format's adapter
    column as written (a name, an integer id, or '' for the base model), else None."""

    arrival_s: np.ndarray  # float64
    prompt_tokens: np.ndarray  # int64
    output_tokens: np.ndarray  # int64
    adapters: tuple[str, ...] | None = None
    prefix_group: np.ndarray | None = None  # int64, -1: no shared prefix (generic `prefix_group`)
    prefix_tokens: np.ndarray | None = None  # int64 (generic `prefix_tokens`)

    def __len__(self) -> int:
        return len(self.arrival_s)


@dataclass(frozen=True, slots=True, eq=False)
class LengthsTable:
    """Prompt and output token counts of a lengths table, one row per request."""

    prompt_tokens: np.ndarray  # int64
    output_tokens: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.prompt_tokens)


@dataclass(frozen=True, slots=True, eq=False)
class FunctionTrace:
    """Invocations per function: either per-minute counts (`minute_counts`, 2019) or one event
    per invocation (`event_function`, `event_time_s`, 2021). Times are trace seconds."""

    functions: tuple[str, ...]
    minute_counts: np.ndarray | None = None  # [functions, minutes] int64
    event_function: np.ndarray | None = None  # [events] int64 index into functions
    event_time_s: np.ndarray | None = None  # [events] float64

    def time_span_s(self) -> tuple[float, float]:
        """[start, end) of the trace in trace seconds."""
        if self.minute_counts is not None:
            return 0.0, 60.0 * self.minute_counts.shape[1]
        assert self.event_time_s is not None
        return float(self.event_time_s.min()), float(self.event_time_s.max())

    def bin_counts(self, bin_s: float, start_s: float, end_s: float) -> np.ndarray:
        """Invocations per function and bin of `bin_s` over [start_s, end_s): [functions, bins];
        the last bin may be shorter."""
        num_bins = max(1, int(np.ceil((end_s - start_s) / bin_s - 1e-9)))
        if self.minute_counts is not None:
            for name, value in (("bin_s", bin_s), ("window start", start_s), ("window end", end_s)):
                if value % 60:
                    raise WorkloadError(
                        f"{name} {value} must be a multiple of 60 s for a "
                        "per-minute (2019) function trace"
                    )
            per_bin = int(bin_s) // 60
            lo, hi = int(start_s // 60), min(int(end_s // 60), self.minute_counts.shape[1])
            window = np.zeros((len(self.functions), num_bins * per_bin), dtype=np.int64)
            window[:, : max(0, hi - lo)] = self.minute_counts[:, lo:hi]
            return window.reshape(len(self.functions), num_bins, per_bin).sum(axis=2)
        assert self.event_time_s is not None and self.event_function is not None
        t = self.event_time_s
        keep = (t >= start_s) & (t < end_s)
        bins = ((t[keep] - start_s) // bin_s).astype(np.int64)
        flat = self.event_function[keep] * num_bins + bins
        counts = np.bincount(flat, minlength=len(self.functions) * num_bins)
        return counts.reshape(len(self.functions), num_bins)


def read_text(path: Path, lines: int | None = None) -> str:
    """The file's text (or its first `lines` lines); WorkloadError naming the line if it is not
    UTF-8."""
    with path.open("rb") as f:
        data = f.read() if lines is None else b"".join(f.readline() for _ in range(lines))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise WorkloadError(f"{path}, line {line}: not UTF-8 text; save the file as UTF-8") from None


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise WorkloadError(f"file {path} does not exist")
    lines = [line for line in read_text(path).splitlines() if line.strip()]
    if len(lines) < 2:
        raise WorkloadError(f"file {path} is empty (no rows after the header)")
    return lines


def _columns(path: Path, header: str, needed: tuple[str, ...]) -> list[int]:
    names = [c.strip() for c in header.split(",")]
    missing = [c for c in needed if c not in names]
    if missing:
        raise WorkloadError(
            f"{path}: header lacks column(s) {', '.join(missing)} "
            f"(expected {','.join(needed)}, got {header.strip()})"
        )
    return [names.index(c) for c in needed]


def _stamp_seconds(stamp: str, days: dict[str, float]) -> float:
    """'2023-11-16 18:15:46.6805900' -> seconds since midnight of the first date seen (kept
    small so the 7 fractional digits survive in a float), parsed by hand for speed."""
    day = stamp[:10]
    base = days.get(day)
    if base is None:
        ordinal = dt.date.fromisoformat(day).toordinal()
        origin = days.setdefault("origin", float(ordinal))
        base = days[day] = (ordinal - origin) * 86400.0
    return base + int(stamp[11:13]) * 3600 + int(stamp[14:16]) * 60 + float(stamp[17:] or 0)


def load_azure_llm_trace(path: Path | str) -> RequestTrace:
    """Azure LLM inference 2023 (`TIMESTAMP,ContextTokens,GeneratedTokens`); arrival 0 is the
    first request. Token counts below 1 become 1."""
    path = Path(path)
    lines = _read_lines(path)
    ts_col, ctx_col, gen_col = _columns(path, lines[0], AZURE_LLM_COLUMNS)
    days: dict[str, float] = {}
    n = len(lines) - 1
    times = np.empty(n)
    prompt = np.empty(n, dtype=np.int64)
    output = np.empty(n, dtype=np.int64)
    try:
        for i, line in enumerate(lines[1:]):
            row = line.split(",")
            times[i] = _stamp_seconds(row[ts_col].strip(), days)
            prompt[i] = int(row[ctx_col])
            output[i] = int(row[gen_col])
    except (ValueError, IndexError, OverflowError) as exc:
        raise WorkloadError(f"{path}, line {i + 2}: cannot parse {line!r} ({exc})") from None
    _check_rows(path, lines[1:], 2, times, "TIMESTAMP", prompt, output, min_tokens=0, min_time=None,
                token_names=("ContextTokens", "GeneratedTokens"))
    order = np.argsort(times, kind="stable")
    times = times[order] - times[order[0]]
    return RequestTrace(times, np.maximum(prompt[order], 1), np.maximum(output[order], 1))


def _check_rows(
    path: Path,
    body: list[str],
    first_line: int,
    times: np.ndarray,
    time_name: str,
    prompt: np.ndarray | None = None,
    output: np.ndarray | None = None,
    min_tokens: int = 1,
    min_time: float | None = 0.0,
    token_names: tuple[str, str] = ("prompt_tokens", "output_tokens"),
) -> None:
    """Raise naming the first row whose time is NaN, infinite or below `min_time` (None: any
    finite time), or whose token counts are below `min_tokens`. `first_line` is the line
    number of `body[0]`."""
    bad_time = ~np.isfinite(times)
    if min_time is not None:
        bad_time |= times < min_time
    at_least = "" if min_time is None else f" >= {min_time:g}"
    checks = [(bad_time, f"{time_name} must be a finite number{at_least}")]
    for name, tokens in zip(token_names, (prompt, output), strict=True):
        if tokens is not None:
            checks.append((tokens < min_tokens, f"{name} must be >= {min_tokens}"))
    for bad, what in checks:
        if bad.any():
            i = int(np.argmax(bad))
            raise WorkloadError(f"{path}, line {i + first_line}: {what} (the row: {body[i]!r})")


def load_generic_trace(path: Path | str) -> RequestTrace:
    """Generic `arrival_s,prompt_tokens,output_tokens[,adapter]` (header optional; without one
    the columns are in this order). Arrival times are kept as written. With a header, the
    optional `prefix_group,prefix_tokens` columns say which requests share their first
    `prefix_tokens` prompt tokens (a system prompt; an empty group: none), for prefix caching."""
    path = Path(path)
    lines = _read_lines(path)
    first = lines[0].split(",")[0].strip()
    has_header = not first.replace(".", "", 1).replace("-", "", 1).isdigit()
    if has_header:
        cols = _columns(path, lines[0], GENERIC_COLUMNS)
        names = [c.strip() for c in lines[0].split(",")]
        cols.append(names.index("adapter") if "adapter" in names else -1)
        if ("prefix_group" in names) != ("prefix_tokens" in names):
            raise WorkloadError(f"{path}: give both prefix_group and prefix_tokens columns, or neither")
        cols += [names.index(c) if c in names else -1 for c in ("prefix_group", "prefix_tokens")]
        body = lines[1:]
    else:
        width = len(lines[0].split(","))
        cols, body = [0, 1, 2, 3 if width > 3 else -1, -1, -1], lines
    n = len(body)
    groups = np.full(n, -1, dtype=np.int64) if cols[4] >= 0 else None
    ptokens = np.zeros(n, dtype=np.int64) if cols[4] >= 0 else None
    times = np.empty(n)
    prompt = np.empty(n, dtype=np.int64)
    output = np.empty(n, dtype=np.int64)
    adapters: list[str] = []
    try:
        for i, line in enumerate(body):
            row = line.split(",")
            times[i], prompt[i], output[i] = (
                float(row[cols[0]]),
                int(row[cols[1]]),
                int(row[cols[2]]),
            )
            if cols[3] >= 0:
                adapters.append(row[cols[3]].strip() if cols[3] < len(row) else "")
            if groups is not None and ptokens is not None:
                g = row[cols[4]].strip() if cols[4] < len(row) else ""
                if g:
                    groups[i], ptokens[i] = int(g), int(row[cols[5]])
                    if groups[i] < 0 or ptokens[i] < 0:
                        raise ValueError("prefix_group and prefix_tokens must be >= 0")
    except (ValueError, IndexError, OverflowError) as exc:
        lineno = i + 1 + has_header
        raise WorkloadError(f"{path}, line {lineno}: cannot parse {line!r} ({exc})") from None
    _check_rows(path, body, 1 + has_header, times, "arrival_s", prompt, output)
    order = np.argsort(times, kind="stable")
    column = tuple(adapters[i] for i in order.tolist()) if cols[3] >= 0 else None
    return RequestTrace(times[order], prompt[order], output[order], column,
                        groups[order] if groups is not None else None,
                        ptokens[order] if ptokens is not None else None)


def detect_trace_format(path: Path | str) -> str:
    """`azure_llm_2023` if the header names TIMESTAMP, else `generic`."""
    header = read_text(Path(path), lines=1)
    return "azure_llm_2023" if "TIMESTAMP" in header else "generic"


def load_request_trace(path: Path | str, format: str | None = None) -> RequestTrace:
    """Load a request trace in `format` (`azure_llm_2023` or `generic`; detected when None)."""
    path = Path(path)
    if not path.is_file():
        raise WorkloadError(f"file {path} does not exist")
    fmt = format or detect_trace_format(path)
    return load_azure_llm_trace(path) if fmt == "azure_llm_2023" else load_generic_trace(path)


def load_lengths_table(path: Path | str) -> LengthsTable:
    """A lengths CSV with `num_prefill_tokens,num_decode_tokens` (or `prompt_tokens,
    output_tokens`) columns; other columns are ignored."""
    path = Path(path)
    lines = _read_lines(path)
    header = lines[0]
    needed = (
        ("prompt_tokens", "output_tokens")
        if "prompt_tokens" in header
        else ("num_prefill_tokens", "num_decode_tokens")
    )
    p_col, o_col = _columns(path, header, needed)
    n = len(lines) - 1
    prompt = np.empty(n, dtype=np.int64)
    output = np.empty(n, dtype=np.int64)
    for i, line in enumerate(lines[1:]):
        row = line.split(",")
        try:
            values = float(row[p_col]), float(row[o_col])
        except (ValueError, IndexError, OverflowError) as exc:
            raise WorkloadError(f"{path}, line {i + 2}: cannot parse {line!r} ({exc})") from None
        if not all(0 <= v < 2**62 for v in values):  # also NaN and inf
            raise WorkloadError(
                f"{path}, line {i + 2}: {needed[0]} and {needed[1]} must be finite numbers >= 0 "
                f"(the row: {line!r})"
            )
        prompt[i], output[i] = int(values[0]), int(values[1])
    return LengthsTable(prompt, output)


def load_azure_functions_2019(path: Path | str) -> FunctionTrace:
    """Azure Functions 2019 per-minute counts (`HashOwner,HashApp,HashFunction,Trigger,1..1440`).
    Rows of the same owner/app/function (different triggers) are summed."""
    path = Path(path)
    lines = _read_lines(path)
    header = [c.strip() for c in lines[0].split(",")]
    if header[:3] != ["HashOwner", "HashApp", "HashFunction"] or len(header) < 5:
        raise WorkloadError(
            f"{path}: expected header HashOwner,HashApp,HashFunction,Trigger,1,"
            f"2,...; got {lines[0][:80]}"
        )
    first = 4 if header[3] == "Trigger" else 3
    minutes = len(header) - first
    index: dict[str, int] = {}
    counts = np.zeros((len(lines) - 1, minutes), dtype=np.int64)
    for lineno, line in enumerate(lines[1:], start=2):
        row = line.split(",")
        if len(row) != len(header):
            raise WorkloadError(
                f"{path}, line {lineno}: {len(row)} columns, header has {len(header)}"
            )
        name = "/".join(c.strip() for c in row[:3])
        k = index.setdefault(name, len(index))
        try:
            row_counts = np.array(row[first:], dtype=np.int64)
        except ValueError as exc:
            raise WorkloadError(f"{path}, line {lineno}: {exc}") from None
        if (row_counts < 0).any():
            raise WorkloadError(f"{path}, line {lineno}: invocation counts must be >= 0")
        counts[k] += row_counts
    return FunctionTrace(tuple(index), minute_counts=counts[: len(index)])


def load_azure_functions_2021(path: Path | str) -> FunctionTrace:
    """Azure Functions 2021 invocations (`app,func,end_timestamp,duration`, seconds). An
    invocation happens at `end_timestamp - duration` (its start; `end_timestamp` when the
    duration column is absent)."""
    path = Path(path)
    lines = _read_lines(path)
    names = [c.strip() for c in lines[0].split(",")]
    app_col, func_col, end_col = _columns(path, lines[0], ("app", "func", "end_timestamp"))
    dur_col = names.index("duration") if "duration" in names else -1
    index: dict[str, int] = {}
    n = len(lines) - 1
    func = np.empty(n, dtype=np.int64)
    times = np.empty(n)
    try:
        for i, line in enumerate(lines[1:]):
            row = line.split(",")
            func[i] = index.setdefault(
                f"{row[app_col].strip()}/{row[func_col].strip()}", len(index)
            )
            times[i] = float(row[end_col]) - (float(row[dur_col]) if dur_col >= 0 else 0.0)
    except (ValueError, IndexError, OverflowError) as exc:
        raise WorkloadError(f"{path}, line {i + 2}: cannot parse {line!r} ({exc})") from None
    _check_rows(path, lines[1:], 2, times, "end_timestamp - duration", min_time=None)
    return FunctionTrace(tuple(index), event_function=func, event_time_s=times)


def load_function_trace(path: Path | str, format: str | None = None) -> FunctionTrace:
    """Load an Azure Functions trace (`azure_functions_2019` / `_2021`; detected when None)."""
    path = Path(path)
    if format is None:
        if not path.is_file():
            raise WorkloadError(f"file {path} does not exist")
        header = read_text(path, lines=1)
        format = (
            "azure_functions_2019" if header.startswith("HashOwner") else "azure_functions_2021"
        )
    if format == "azure_functions_2019":
        return load_azure_functions_2019(path)
    return load_azure_functions_2021(path)
