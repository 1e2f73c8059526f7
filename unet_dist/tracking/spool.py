"""The tracking spool: records the MLflow server has not taken yet, kept next to the run's
checkpoints (``<run_dir>/tracking_spool/``) so that neither an outage nor the end of the job loses them.

A record is one JSON object with a sequence number ``seq`` (the order it was logged in) and a
``kind`` (:mod:`unet_dist.tracking.records`). The spool is a set of segments, each one object written
whole (``<first seq>-<last seq>.jsonl``, atomic on a path and on object storage alike, so no append is
needed): a header line naming the run and the tracking URI, then the records. A segment is removed
once every record in it has been delivered; a crash between delivering and removing sends some
records twice, which the delivery makes harmless (:mod:`unet_dist.tracking.records`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from unet_dist import storage
from unet_dist.errors import UnetDistError

FOLDER = "tracking_spool"
SUFFIX = ".jsonl"


@dataclass(frozen=True)
class Segment:
    first: int
    last: int
    name: str


def segments(spool: storage.Location) -> list[Segment]:
    """The spool's segments, oldest first; [] when there is no spool."""
    found = []
    for name in spool.listdir():
        stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else ""
        first, _, last = stem.partition("-")
        if first.isdigit() and last.isdigit():
            found.append(Segment(int(first), int(last), name))
    return sorted(found, key=lambda s: s.first)


def write(spool: storage.Location, records: list[dict], run_id: str, tracking_uri: str) -> Segment:
    """One new segment holding ``records`` (in ``seq`` order, all JSON-ready)."""
    first, last = records[0]["seq"], records[-1]["seq"]
    header = {"run_id": run_id, "tracking_uri": tracking_uri}
    lines = [json.dumps(header)] + [json.dumps(r, separators=(",", ":")) for r in records]
    seg = Segment(first, last, f"{first:012d}-{last:012d}{SUFFIX}")
    (spool / seg.name).write_bytes(("\n".join(lines) + "\n").encode())
    return seg


def read(spool: storage.Location) -> tuple[dict, list[dict]]:
    """The header of the newest segment (``run_id``, ``tracking_uri``) and every record, in order,
    each once (segments may overlap after a crash)."""
    header, records, seen = {}, [], set()
    for seg in segments(spool):
        where = spool / seg.name
        try:
            lines = where.read_text().splitlines()
            header = json.loads(lines[0])
            batch = [json.loads(line) for line in lines[1:] if line]
        except (ValueError, IndexError) as e:
            raise UnetDistError(f"{where}: not a tracking spool segment ({e}); expected a JSON header "
                                "line, then one JSON record per line") from None
        for rec in batch:
            if rec["seq"] not in seen:
                seen.add(rec["seq"])
                records.append(rec)
    return header, sorted(records, key=lambda r: r["seq"])


def drop_through(spool: storage.Location, seq: int) -> None:
    """Remove the segments whose records are all delivered (``last <= seq``)."""
    for seg in segments(spool):
        if seg.last <= seq:
            (spool / seg.name).remove()
