"""Perfetto protobuf traces of a run, and a reader for them.

A run's events become a trace that ui.perfetto.dev opens directly, laid out like the real RBLN
profiler: a Host group, then one group per device with its DMA, compute and link tracks. The
reader exists because Perfetto's TraceProcessor needs a binary download; tests and the text
summary parse the protobuf themselves instead.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from google.protobuf.message import DecodeError
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import (
    DebugAnnotation,
    Trace,
    TracePacket,
    TrackDescriptor,
    TrackEvent,
)

from rebel.device.events import DEVICE_TRACKS, HOST, Event

# Every packet we write belongs to one producer sequence; the id only has to be non-zero.
_SEQUENCE_ID = 0x5EB1
# Fixed uuid base so the same events always give byte-identical traces.
_UUID_BASE = 0x0E4B_1000_0000
_TRACK_ORDER = (HOST, *DEVICE_TRACKS)
_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class TraceSlice:
    """One slice read back from a trace, with the names of its track and of the track's group."""

    track: str
    group: str
    name: str
    start_ns: int
    end_ns: int
    category: str = ""
    args: dict = field(default_factory=dict)
    flow_ids: tuple[int, ...] = ()
    terminating_flow_ids: tuple[int, ...] = ()

    @property
    def dur_ns(self) -> int:
        return self.end_ns - self.start_ns


def _to_ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def _span_ns(event: Event, offset_s: float = 0.0) -> tuple[int, int]:
    # Zero-length slices get 1 ns so the UI still draws them and nesting stays well defined.
    start = _to_ns(event.start_s + offset_s)
    return start, max(_to_ns(event.start_s + offset_s + event.dur_s), start + 1)


def _group_name(device: int | None, device_names: dict[int, str]) -> str:
    if device is None:
        return HOST
    return device_names.get(device, f"NPU {device}")


def _track_rank(track: str) -> tuple[int, str]:
    return (_TRACK_ORDER.index(track), "") if track in _TRACK_ORDER else (len(_TRACK_ORDER), track)


def _assign_lanes(
    spans: list[tuple[int, int, Event]], open_ends: list[list[int]]
) -> list[list[tuple[int, int, Event]]]:
    """Split one track's slices into lanes where slices only ever nest.

    BEGIN/END events on a single Perfetto track must form a stack; two partially overlapping
    transfers would be mis-paired. Each lane is a stack-consistent sequence; extra lanes become
    sibling tracks with the same name. `open_ends` (one stack of slice ends per lane) is the
    state carried from earlier batches, so a trace appended run by run keeps the same lanes,
    and nesting across runs, as one written at once. Returns this batch's slices per lane.
    """
    lanes: list[list[tuple[int, int, Event]]] = [[] for _ in open_ends]
    for span in sorted(spans, key=lambda s: (s[0], -s[1])):
        start, end, _ = span
        for lane, stack in zip(lanes, open_ends):
            while stack and stack[-1] <= start:
                stack.pop()
            if not stack or end <= stack[-1]:
                lane.append(span)
                stack.append(end)
                break
        else:
            lanes.append([span])
            open_ends.append([end])
    return lanes


def _lane_packets(lane: list[tuple[int, int, Event]]) -> list[tuple[int, Event | None]]:
    """(timestamp, event-for-begin or None-for-end) in an order that keeps the stack valid."""
    out: list[tuple[int, Event | None]] = []
    stack: list[int] = []
    for start, end, event in lane:
        while stack and stack[-1] <= start:
            out.append((stack.pop(), None))
        out.append((start, event))
        stack.append(end)
    while stack:
        out.append((stack.pop(), None))
    return out


def _annotate(annotation: DebugAnnotation, key: str, value: Any) -> None:
    annotation.name = str(key)
    if isinstance(value, bool):
        annotation.bool_value = value
    elif isinstance(value, int) and _INT64[0] <= value <= _INT64[1]:
        annotation.int_value = value
    elif isinstance(value, float):
        annotation.double_value = value
    elif isinstance(value, (list, tuple)):
        annotation.string_value = ", ".join(str(v) for v in value)
    else:
        annotation.string_value = str(value)


def _fill_track(
    packet: TracePacket, uuid: int, name: str, parent: int | None, rank: int, ordered_children: bool
) -> None:
    packet.trusted_packet_sequence_id = _SEQUENCE_ID
    desc = packet.track_descriptor
    desc.uuid = uuid
    desc.name = name
    if parent is not None:
        desc.parent_uuid = parent
    desc.sibling_order_rank = rank
    if ordered_children:
        desc.child_ordering = _EXPLICIT
    else:
        # Lanes of one track share its name; keep the UI from folding them into one row.
        desc.sibling_merge_behavior = TrackDescriptor.SiblingMergeBehavior.SIBLING_MERGE_BEHAVIOR_NONE


# Looked up once: protobuf enum attribute access is slow, and this runs per slice per run.
_EXPLICIT = TrackDescriptor.ChildTracksOrdering.EXPLICIT
_SLICE_BEGIN = TrackEvent.Type.TYPE_SLICE_BEGIN
_SLICE_END = TrackEvent.Type.TYPE_SLICE_END


def _fill_event(packet: TracePacket, ts: int, track_uuid: int, event: Event | None,
                flow_base: int) -> None:
    packet.trusted_packet_sequence_id = _SEQUENCE_ID
    packet.timestamp = ts
    te = packet.track_event
    te.track_uuid = track_uuid
    if event is None:
        te.type = _SLICE_END
        return
    te.type = _SLICE_BEGIN
    te.name = event.name
    if event.category:
        te.categories.append(event.category)
    for key, value in event.args.items():
        _annotate(te.debug_annotations.add(), key, value)
    te.flow_ids.extend(f + flow_base for f in event.flow_out)
    te.terminating_flow_ids.extend(f + flow_base for f in event.flow_in)


# Tracks of one group are ordered by kind (Host, DMA, compute, link ...), then lane; a rank
# is fixed when a track first appears, so tracks added by a later run still sort correctly.
_LANE_SLOTS = 1024


class TraceEncoder:
    """Encodes events into serialized `Trace` chunks that concatenate into one valid trace.

    `Trace.packet` is a repeated field, so serialized `Trace` messages appended one after
    another parse as a single trace. The encoder remembers which track descriptors it has
    already emitted (and each track's lane state), so every chunk carries only the
    descriptors of tracks that are new, then that batch's slices. Its memory is the set of
    tracks, not the events: a profiler can append each run to the file as it happens.
    """

    def __init__(self, device_names: dict[int, str], title: str = "open-rbln"):
        self.device_names = device_names
        self.title = title
        self._next_uuid = _UUID_BASE
        self._root: int | None = None
        self._groups: dict[int | None, int] = {}  # device -> group track uuid
        self._lanes: dict[tuple[int | None, str], list[int]] = {}  # (device, track) -> lane uuids
        self._open_ends: dict[tuple[int | None, str], list[list[int]]] = {}
        self._ranks: dict[tuple[int | None, str], int] = {}  # base rank of a track kind

    def _uuid(self) -> int:
        uuid, self._next_uuid = self._next_uuid, self._next_uuid + 1
        return uuid

    @property
    def tracks(self) -> int:
        """How many lane tracks have been described so far (bounded by the model, not the runs)."""
        return sum(len(lanes) for lanes in self._lanes.values())

    @property
    def open_ends(self) -> int:
        """Slice ends remembered for lane assignment: bounded by nesting depth, not by runs."""
        return sum(len(stack) for stacks in self._open_ends.values() for stack in stacks)

    def _track_rank(self, device: int | None, track: str) -> int:
        key = (device, track)
        if key not in self._ranks:
            if track in _TRACK_ORDER:
                kind = _TRACK_ORDER.index(track)
            else:  # unknown kinds after the known ones, in order of first appearance
                kind = len(_TRACK_ORDER) + sum(
                    1 for d, t in self._ranks if d == device and t not in _TRACK_ORDER)
            self._ranks[key] = kind * _LANE_SLOTS
        return self._ranks[key]

    def encode(self, events: Iterable[Event], offset_s: float = 0.0, flow_base: int = 0) -> bytes:
        """One serialized `Trace` chunk: descriptors of new tracks, then `events` as slices.

        `offset_s` and `flow_base` shift the events' times and flow ids while encoding, so a
        caller putting run after run on one clock need not copy every event first.
        """
        chunk = Trace()
        if self._root is None:
            first = chunk.packet.add()
            first.trusted_packet_sequence_id = _SEQUENCE_ID
            first.sequence_flags = TracePacket.SequenceFlags.SEQ_INCREMENTAL_STATE_CLEARED
            self._root = self._uuid()
            first.track_descriptor.uuid = self._root
            first.track_descriptor.name = self.title
            first.track_descriptor.child_ordering = _EXPLICIT

        by_group: dict[int | None, dict[str, list[tuple[int, int, Event]]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for event in events:
            start, end = _span_ns(event, offset_s)
            by_group[event.device][event.track].append((start, end, event))

        timeline: list[tuple[int, int, Event | None]] = []  # (ts, track uuid, begin event or None)
        for device in sorted(by_group, key=lambda d: (d is not None, d if d is not None else 0)):
            if device not in self._groups:
                self._groups[device] = self._uuid()
                rank = 0 if device is None else device + 1  # Host first, then devices by id
                _fill_track(chunk.packet.add(), self._groups[device],
                            _group_name(device, self.device_names), self._root, rank, True)
            group_uuid = self._groups[device]
            tracks = by_group[device]
            for track in sorted(tracks, key=_track_rank):
                key = (device, track)
                uuids = self._lanes.setdefault(key, [])
                lanes = _assign_lanes(tracks[track], self._open_ends.setdefault(key, []))
                for index, lane in enumerate(lanes):
                    if index == len(uuids):
                        uuids.append(self._uuid())
                        rank = self._track_rank(device, track) + min(index, _LANE_SLOTS - 1)
                        _fill_track(chunk.packet.add(), uuids[index], track, group_uuid, rank, False)
                    timeline.extend((ts, uuids[index], ev) for ts, ev in _lane_packets(lane))

        # Stable sort: equal timestamps keep each lane's end-before-begin order.
        timeline.sort(key=lambda item: item[0])
        for ts, uuid, event in timeline:
            _fill_event(chunk.packet.add(), ts, uuid, event, flow_base)
        return chunk.SerializeToString()


def write_trace(
    path: str | Path,
    events: Iterable[Event],
    device_names: dict[int, str],
    title: str = "open-rbln",
) -> Path:
    """Write `events` as a Perfetto protobuf trace at `path` and return the path.

    Everything hangs under one root track named `title` so the group order (Host, then devices
    by id) is explicit rather than left to the UI's heuristics.
    """
    path = Path(path)
    data = TraceEncoder(device_names, title).encode(events)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _annotation_value(annotation: DebugAnnotation) -> Any:
    kind = annotation.WhichOneof("value")
    if kind is None:
        return None
    return getattr(annotation, kind)


def _parse(path: Path) -> Trace:
    data = path.read_bytes()
    try:
        trace = Trace.FromString(data)
    except DecodeError as exc:
        raise ValueError(f"{path} is not a Perfetto protobuf trace: {exc}") from exc
    # Protobuf happily decodes some garbage into empty messages; a real trace has real packets.
    if not any(packet.ListFields() for packet in trace.packet):
        raise ValueError(f"{path} is not a Perfetto protobuf trace: it holds no trace packets")
    return trace


def read_trace(path: str | Path) -> list[TraceSlice]:
    """Parse a trace written by `write_trace` (or any track-event trace) into slices by start."""
    path = Path(path)
    trace = _parse(path)
    names: dict[int, str] = {}
    parents: dict[int, int] = {}
    for packet in trace.packet:
        if packet.HasField("track_descriptor"):
            desc = packet.track_descriptor
            names[desc.uuid] = desc.name
            if desc.HasField("parent_uuid"):
                parents[desc.uuid] = desc.parent_uuid

    slices: list[TraceSlice] = []
    open_slices: dict[int, list[tuple[int, TrackEvent]]] = defaultdict(list)

    def close(track_uuid: int, begin_ts: int, begin: TrackEvent, end_ts: int) -> None:
        parent = parents.get(track_uuid)
        slices.append(
            TraceSlice(
                track=names.get(track_uuid, ""),
                group=names.get(parent, "") if parent is not None else "",
                name=begin.name,
                start_ns=begin_ts,
                end_ns=max(end_ts, begin_ts),
                category=begin.categories[0] if begin.categories else "",
                args={a.name: _annotation_value(a) for a in begin.debug_annotations},
                flow_ids=tuple(begin.flow_ids),
                terminating_flow_ids=tuple(begin.terminating_flow_ids),
            )
        )

    for packet in trace.packet:
        if not packet.HasField("track_event"):
            continue
        te = packet.track_event
        ts = packet.timestamp
        if te.type == TrackEvent.Type.TYPE_SLICE_BEGIN:
            open_slices[te.track_uuid].append((ts, te))
        elif te.type == TrackEvent.Type.TYPE_SLICE_END:
            stack = open_slices[te.track_uuid]
            if stack:
                begin_ts, begin = stack.pop()
                close(te.track_uuid, begin_ts, begin, ts)
        elif te.type == TrackEvent.Type.TYPE_INSTANT:
            close(te.track_uuid, ts, te, ts)
    return sorted(slices, key=lambda s: (s.start_ns, -s.end_ns, s.group, s.track))
