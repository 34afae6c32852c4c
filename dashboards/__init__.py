"""tunewatch's Grafana dashboards, built as code; the JSON in grafana/ is generated from them.

`python -m dashboards` writes the boards, and a unit test fails when the committed JSON and
the code differ, so the JSON that Grafana provisions is always the reviewed code's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.cog.encoder import JSONEncoder

from dashboards import drift, loop, overview, quality, serving
from dashboards.common import Board

BOARDS: tuple[Board, ...] = (overview.BOARD, serving.BOARD, quality.BOARD, drift.BOARD, loop.BOARD)
GRAFANA_DIR = Path(__file__).parent / "grafana"


def render(board: Board) -> str:
    """The board as Grafana dashboard JSON, byte-stable so that a diff is a real change."""
    return json.dumps(board.dashboard, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def write(directory: Path = GRAFANA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for board in BOARDS:
        path = directory / f"{board.name}.json"
        path.write_text(render(board))
        paths.append(path)
    return paths


@dataclass(frozen=True)
class PanelQuery:
    """One query of a board as a plain Prometheus runs it (Grafana's variables substituted).

    only_after: for a panel (or annotation) that only shows events, the event it waits for;
    None where it shows data as soon as tunewatch serves and the monitor has run.
    """

    board: str
    panel: str
    expr: str
    only_after: str | None


def panel_queries(rate_interval: str = "1m") -> list[PanelQuery]:
    """Every panel's and annotation's query over every adapter, rates over `rate_interval`."""

    def plain(expr: str) -> str:
        return re.sub(r"\$\{?adapter\}?", ".+", expr.replace("$__rate_interval", rate_interval))

    queries = []
    for board in BOARDS:
        model = json.loads(render(board))
        title = model["title"]
        for annotation in model["annotations"]["list"]:
            event = f"the event it marks: {annotation['name'].lower()}"
            queries.append(PanelQuery(title, annotation["name"], plain(annotation["expr"]), event))
        for panel in model["panels"]:
            for target in panel.get("targets", []):
                only_after = board.only_after.get(panel["title"])
                queries.append(PanelQuery(title, panel["title"], plain(target["expr"]), only_after))
    return queries
