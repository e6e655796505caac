"""One line per finished step, a spinner while it runs: merges of large models take minutes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console


@contextmanager
def step(console: Console, text: str) -> Iterator[None]:
    start = time.perf_counter()
    with console.status(f"{text} …"):
        yield
    console.print(f"[green]✓[/] {text} [dim]({time.perf_counter() - start:.1f} s)[/]")
