"""Scoring rows that a killed inference actor's retries deliver twice reach the outputs once.

Ray Data restarts a killed actor and retries its unfinished blocks, so rows can arrive again.
SlideCollector drops them. tests/test_multinode.py kills the inference actor of a scoring job on
a multi-node cluster and checks that every tile of every real frame is scored exactly once.
"""

import json

import pyarrow as pa

from cervi_ray.scoring.pipeline import SlideCollector
from cervi_ray.scoring.stages import HEADER_INDEX, STAGE_SCHEMA


def stage_rows(slide_id: str, indices: list[int], tiles_kept: int = 3) -> pa.Table:
    """Return summarise-stage rows of `slide_id`: a header for index -1, an ok tile for the others."""
    rows = []
    for index in indices:
        header = index == HEADER_INDEX
        rows.append({
            "slide_id": slide_id, "tile_index": index, "x": 10 * index, "y": 0, "status": "header" if header else "ok",
            "error": "", "slide_info": json.dumps({"status": "ok", "tiles_kept": tiles_kept}) if header else "",
            "thumbnail": b"",
        })
    return pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)


def test_collector_drops_repeated_rows():
    collector = SlideCollector()

    assert collector.add(stage_rows("a", [HEADER_INDEX, 0, 1])) == []
    # A retried batch delivers tile 1 and the header again, then the missing tile 2 arrives.
    assert collector.add(stage_rows("a", [1, HEADER_INDEX])) == []
    completed = collector.add(stage_rows("a", [1, 2]))

    assert [slide_id for slide_id, *_ in completed] == ["a"]
    _, info, _, rows = completed[0]
    assert info["tiles_kept"] == 3
    assert sorted(rows["tile_index"].to_pylist()) == [HEADER_INDEX, 0, 1, 2]
    # Rows of a slide already returned do not start it over.
    assert collector.add(stage_rows("a", [2])) == []
    assert collector.unfinished() == []
