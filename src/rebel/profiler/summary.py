"""A plain-text digest of a run, for terminals, logs and CI where opening Perfetto is too much.

It answers the first questions one asks of a trace: how long did it take, which engine was
busy, which kernels dominate, what fell back to the host, and how many bytes moved.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from rebel.device.events import DEVICE_TRACKS, HOST, NEURAL_ENGINE, Event
from rebel.profiler.perfetto_trace import TraceSlice, read_trace

_KERNEL_INDEX = re.compile(r"^\d+_")
_TRACK_ORDER = (HOST, *DEVICE_TRACKS)
_TOP_KERNELS = 10


@dataclass(frozen=True)
class _Row:
    group: str
    track: str
    name: str
    start_ns: int
    end_ns: int
    category: str
    args: dict


def _rows(items: Iterable[TraceSlice | Event], device_names: dict[int, str]) -> list[_Row]:
    rows = []
    for item in items:
        if isinstance(item, TraceSlice):
            rows.append(
                _Row(item.group, item.track, item.name, item.start_ns, item.end_ns,
                     item.category, item.args)
            )
        else:
            group = HOST if item.device is None else device_names.get(item.device, f"NPU {item.device}")
            start = int(round(item.start_s * 1e9))
            end = max(int(round(item.end_s * 1e9)), start)
            rows.append(_Row(group, item.track, item.name, start, end, item.category, item.args))
    return rows


def _busy_ns(rows: Sequence[_Row]) -> int:
    # Union of intervals: nested or overlapping slices must not count twice.
    total, cur_start, cur_end = 0, None, None
    for row in sorted(rows, key=lambda r: r.start_ns):
        if cur_end is None or row.start_ns > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = row.start_ns, row.end_ns
        else:
            cur_end = max(cur_end, row.end_ns)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def _us(ns: float) -> str:
    return f"{ns / 1e3:,.3f}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int) -> list[str]:
    """Columns before `numeric_from` are left aligned text, the rest right aligned numbers."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if i < numeric_from else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "  " + "  ".join(parts).rstrip()

    return [line(headers), "  " + "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _group_key(group: str) -> tuple[int, str]:
    return (0, group) if group == HOST else (1, group)


def _track_key(track: str) -> tuple[int, str]:
    return (_TRACK_ORDER.index(track), "") if track in _TRACK_ORDER else (len(_TRACK_ORDER), track)


def summarize(
    slices_or_events: Iterable[TraceSlice | Event],
    device_names: dict[int, str] | None = None,
) -> str:
    """Summarize slices from `read_trace` or raw runtime Events (times shown in microseconds)."""
    rows = _rows(slices_or_events, device_names or {})
    if not rows:
        return "Trace summary\n  (no slices)\n"
    t0 = min(r.start_ns for r in rows)
    span = max(r.end_ns for r in rows) - t0
    out = ["Trace summary", f"  span: {_us(span)} us  ({len(rows)} slices)", ""]

    per_track: dict[tuple[str, str], list[_Row]] = defaultdict(list)
    for r in rows:
        per_track[(r.group, r.track)].append(r)
    keys = sorted(per_track, key=lambda k: (_group_key(k[0]), _track_key(k[1])))
    busy_rows = []
    for group, track in keys:
        busy = _busy_ns(per_track[(group, track)])
        pct = 100.0 * busy / span if span else 0.0
        busy_rows.append((group, track, str(len(per_track[(group, track)])), _us(busy), f"{pct:.1f}%"))
    out += ["Busy time per track"]
    out += _table(("group", "track", "slices", "busy us", "% span"), busy_rows, 2)

    kernels: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        if r.track == NEURAL_ENGINE:
            kernels[_KERNEL_INDEX.sub("", r.name)].append(r.end_ns - r.start_ns)
    if kernels:
        top = sorted(kernels.items(), key=lambda kv: (-sum(kv[1]), kv[0]))[:_TOP_KERNELS]
        kernel_rows = [
            (name, str(len(d)), _us(sum(d)), _us(sum(d) / len(d))) for name, d in top
        ]
        out += ["", f"Top kernels on {NEURAL_ENGINE} (of {len(kernels)})"]
        out += _table(("kernel", "count", "total us", "avg us"), kernel_rows, 1)

    fallbacks: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        if r.group == HOST and r.category == "fallback":
            fallbacks[r.name].append(r.end_ns - r.start_ns)
    out += ["", "Host fallbacks"]
    if fallbacks:
        fb_rows = [
            (name, str(len(d)), _us(sum(d)))
            for name, d in sorted(fallbacks.items(), key=lambda kv: -sum(kv[1]))
        ]
        out += _table(("op", "count", "total us"), fb_rows, 1)
    else:
        out += ["  none"]

    moved: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        value = r.args.get("bytes")
        if isinstance(value, int) and not isinstance(value, bool):
            moved[(r.group, r.track)] += value
    if moved:
        byte_rows = [
            (group, track, str(moved[(group, track)]), _bytes(moved[(group, track)]))
            for group, track in sorted(moved, key=lambda k: (_group_key(k[0]), _track_key(k[1])))
        ]
        out += ["", "Bytes moved"]
        out += _table(("group", "track", "bytes", "size"), byte_rows, 2)
    return "\n".join(out) + "\n"


def summarize_file(path: str | Path) -> str:
    """Summarize a trace file written by `write_trace`."""
    return summarize(read_trace(path))
