"""data_report.json, rejects.jsonl and the human summary at the end of `rayft prepare`."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rayft.errors import RayftError

SPLITS = ("train", "validation", "test")


def write_rejects(path: Path, rejects: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for r in rejects:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def error_summary(rejects: list[dict[str, Any]], first: int = 10) -> str:
    """The first errors (file:line field: reason) and the counts per kind."""
    counts = Counter(r["kind"] for r in rejects)
    lines = [f"  {r['file']}:{r['line']} {r['field']}: {r['reason']}" for r in rejects[:first]]
    if len(rejects) > first:
        lines.append(f"  ... and {len(rejects) - first} more")
    lines.append("counts: " + ", ".join(f"{k}={n}" for k, n in counts.most_common()))
    return "\n".join(lines)


class AccountingError(RayftError):
    """The rows of a prepare run do not add up: a bug in rayft, not in the data."""


def check_accounting(report: dict[str, Any]) -> None:
    """rows_in = Σ rows_out + Σ rejected + Σ duplicates_removed + overlength.dropped."""
    terms = {
        "rows_out": report["rows_out"],
        "rejected": report["rejected"],
        "duplicates_removed": report["duplicates_removed"],
    }
    accounted = sum(sum(v.values()) for v in terms.values()) + report["overlength"]["dropped"]
    if accounted != report["rows_in"]:
        parts = [f"{name} {sum(v.values())} {dict(v)}" for name, v in terms.items()]
        parts.append(f"overlength.dropped {report['overlength']['dropped']}")
        raise AccountingError(
            f"prepare's row counts disagree: rows_in={report['rows_in']} but "
            f"{' + '.join(parts)} = {accounted} ({report['rows_in'] - accounted:+d} rows "
            "unaccounted for); nothing is wrong with the data: please report this as a bug"
        )


def print_summary(
    report: dict[str, Any], data_dir: Path, seconds: float, notes: Sequence[str] = ()
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rayft prepare: {data_dir}", show_header=True)
    table.add_column("", style="bold")
    table.add_column("rows", justify="right")
    table.add_column("tokens", justify="right")
    for s in SPLITS:
        table.add_row(s, str(report["rows_out"][s]), str(report["tokens"][s]))
    table.add_row("rejected", str(sum(report["rejected"].values())), "")
    table.add_row(
        "duplicates (exact/near)", "{exact}/{near}".format(**report["duplicates_removed"]), ""
    )
    table.add_row(
        "overlength (dropped/truncated)", "{dropped}/{truncated}".format(**report["overlength"]), ""
    )
    console = Console()
    console.print(table)
    pii = ", ".join(f"{k}={n}" for k, n in report["pii_redactions"].items() if n) or "none"
    formats = ", ".join(f"{Path(f).name}={fmt}" for f, fmt in report["formats"].items())
    console.print(
        f"{report['rows_in']} rows in ({formats}); PII replaced: {pii}; packing efficiency "
        f"{report['packing_efficiency']:.3f} (real tokens / capacity of packed sequences); "
        f"{seconds:.1f} s"
    )
    for note in notes:  # how input files that were named twice were resolved
        console.print(f"note: {note}")
    if report["rejected"]:
        kinds = ", ".join(f"{k}={n}" for k, n in report["rejected"].items())
        console.print(f"rejected rows ({kinds}) are in {data_dir / 'rejects.jsonl'}")
