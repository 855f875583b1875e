"""The demo's terminal view: a rich live panel while blocks flow, then a summary table.

``DemoDisplay(out, target_blocks=N)`` is a context manager. In a terminal it shows a live panel
(progress bar of block attempts, committed/aborted, secret and sifted bits and rates, QBER, f,
authentication mode, the last event lines); elsewhere (a pipe, a file, ``--json`` runs) it falls
back to printing each event line as plain text. Nothing secret
is ever passed in: ``Progress`` holds public counts only.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from qkdnode.demo.progress import Progress

RECENT_LINES: Final = 6


class DemoDisplay:
    """Live view of the demo's :class:`~qkdnode.demo.progress.Progress`.

    ``live``: None decides from ``out`` (a terminal gets the live view); ``clock`` is a
    monotonic clock for the rates (``Progress.started_s`` uses ``time.monotonic``).
    """

    def __init__(
        self,
        out: TextIO,
        *,
        target_blocks: int | None = None,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out
        self.target_blocks = target_blocks
        self.console = Console(file=out, force_terminal=live, highlight=False)
        self.is_live = self.console.is_terminal if live is None else live
        self._clock = clock
        self._recent: collections.deque[str] = collections.deque(maxlen=RECENT_LINES)
        self._live: Live | None = None
        self._last: Progress | None = None

    def __enter__(self) -> DemoDisplay:
        if self.is_live:
            self._live = Live(
                Text("waiting for the first block ..."),
                console=self.console,
                refresh_per_second=4,
                transient=False,
            )
            self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the live view (leaving its last frame on screen); idempotent."""
        if self._live is not None:
            if self._last is not None:
                self._live.update(self.render(self._last))
            self._live.stop()
            self._live = None

    def update(self, progress: Progress, line: str | None = None) -> None:
        """Show the current progress; ``line`` is the event line ``Progress.feed`` returned."""
        self._last = progress
        if line:
            self._recent.append(line)
        if self._live is None:
            if line:
                print(line, file=self.out, flush=True)
            return
        self._live.update(self.render(progress))

    def message(self, text: str) -> None:
        """A line outside the live panel (printed above it in a terminal)."""
        if self._live is not None:
            self._live.console.print(text, markup=False)
        else:
            print(text, file=self.out, flush=True)

    def render(self, progress: Progress) -> Panel:
        """The live panel for ``progress`` (public for tests and for a final redraw)."""
        elapsed_s = max(self._clock() - progress.started_s, 1e-9)
        facts = Table.grid(padding=(0, 2))
        facts.add_column(style="bold")
        facts.add_column()
        attempts = progress.attempts
        target = self.target_blocks
        blocks = f"{progress.committed} committed, {progress.aborted} aborted"
        if progress.abort_reasons:
            blocks += " (" + ", ".join(f"{k} {v}" for k, v in progress.abort_reasons.items()) + ")"
        facts.add_row("blocks", blocks)
        facts.add_row(
            "secret key",
            f"{progress.secret_bits:,} bits, {progress.secret_bits / elapsed_s:,.0f} bit/s",
        )
        facts.add_row(
            "sifted key",
            f"{progress.sifted_bits:,} bits, {progress.sifted_bits / elapsed_s:,.0f} bit/s",
        )
        qber = f"{100 * progress.qbers[-1]:.2f} %" if progress.qbers else "-"
        if progress.qbers:
            qber += f" (mean {100 * sum(progress.qbers) / len(progress.qbers):.2f} %)"
        facts.add_row("QBER", qber)
        facts.add_row("authentication", progress.auth_mode)
        facts.add_row("elapsed", f"{elapsed_s:.0f} s")
        if progress.errors:
            facts.add_row(Text("errors", style="bold red"), ", ".join(progress.errors[-3:]))
        parts: list[Any] = []
        if target:
            parts.append(ProgressBar(total=target, completed=min(attempts, target), width=50))
            parts.append(Text(f"{attempts} / {target} block attempts"))
        parts.append(facts)
        if self._recent:
            parts.append(Text("\n".join(self._recent), style="dim"))
        return Panel(Group(*parts), title="qkdnode demo", border_style="cyan")

    def final_table(self, summary: Mapping[str, Any]) -> None:
        """Print the demo's summary: a table in a terminal, ``name: value`` lines otherwise."""
        self.close()
        if not self.is_live:
            print("\nsummary", file=self.out)
            for name, value in summary.items():
                print(f"  {name}: {value}", file=self.out)
            self.out.flush()
            return
        table = Table(title="qkdnode demo summary", show_header=True, header_style="bold")
        table.add_column("item")
        table.add_column("value", overflow="fold")
        for name, value in summary.items():
            table.add_row(name, _cell(name, value))
        self.console.print(table)


def _cell(name: str, value: Any) -> Text:
    if isinstance(value, Mapping):
        text = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list):
        text = " → ".join(str(v) for v in value) or "-"
    else:
        text = "-" if value is None else str(value)
    if name == "keys_match":
        return Text(text, style="bold green" if value else "bold red")
    return Text(text)
