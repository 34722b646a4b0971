"""`python -m sweep status DIR --watch [SECONDS]`: the sweep's status and one row per trial (status,
step, eval loss, tokens/s, peak memory, time left, config), redrawn every SECONDS until the sweep's
driver ends (then drawn once more) or Ctrl-C.

On a terminal rich draws the table in place (plain text, the screen cleared and redrawn, where rich
is missing); to a file or a pipe each refresh is appended as plain text. A sweep without a running
driver (finished, stopped, crashed) is drawn once.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from sweep.readback.status import TABLE_COLUMNS, sweep_status, table_cells, trial_table
from sweep.folder import driver

CLEAR = "\033[H\033[2J"  # cursor home, clear screen


def watch(folder: Path, every: float, out: TextIO | None = None) -> None:
    """Draw until the driver is gone (a finished, stopped or crashed sweep: once); Ctrl-C ends it quietly."""
    out = out or sys.stdout
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C leaves even where the shell or parent started us with SIGINT ignored (inherited
        # across exec, and then Python installs no KeyboardInterrupt handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    view = _RichView(out) if _rich_wanted(out) else _PlainView(out)
    try:
        while True:
            live = driver(folder) is not None  # asked before reading: the last draw after it ends is complete
            lines: list[str] = []
            info = sweep_status(folder, lines.append)
            stamp = time.strftime("%H:%M:%S")
            lines.append(f"{stamp}: every {every:g}s; Ctrl-C to leave" if live else f"{stamp}: no driver is running it; nothing more will change")
            view.draw(lines, info["trials"])
            if not live:
                return
            time.sleep(every)
    except KeyboardInterrupt:
        pass
    finally:
        view.close()


def _rich_wanted(out: TextIO) -> bool:
    """rich on a terminal (it is a dependency; a bare install without it draws plain text)."""
    from importlib.util import find_spec

    return out.isatty() and find_spec("rich") is not None


class _PlainView:
    def __init__(self, out: TextIO):
        self.out, self.tty = out, out.isatty()

    def draw(self, lines: list[str], rows: list[dict[str, Any]]) -> None:
        text = "\n".join([*lines, "", *trial_table(rows)]) + "\n"
        self.out.write((CLEAR + text) if self.tty else text + "\n")
        self.out.flush()

    def close(self) -> None:
        pass


class _RichView:
    def __init__(self, out: TextIO):
        from rich.console import Console
        from rich.live import Live

        self.live = Live(console=Console(file=out), auto_refresh=False, redirect_stdout=False, redirect_stderr=False)
        self.live.start()

    def draw(self, lines: list[str], rows: list[dict[str, Any]]) -> None:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, header_style="bold", pad_edge=False)
        for name in TABLE_COLUMNS:
            table.add_column(name, justify="right" if name in ("STEP", "EVAL LOSS", "TOK/S", "ETA") else "left", no_wrap=name != "CONFIG")
        for row in rows:
            table.add_row(*table_cells(row))
        self.live.update(Group(Text("\n".join(lines)), Text(""), table), refresh=True)

    def close(self) -> None:
        self.live.stop()
