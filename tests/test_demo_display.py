"""DemoDisplay: plain lines off a terminal, a live panel and a summary table in one."""

from __future__ import annotations

import io

from qkdnode.demo.display import DemoDisplay
from qkdnode.demo.progress import Progress


def committed(block: int, qber: float, secret_bits: int) -> dict[str, object]:
    return {
        "event": "block.committed",
        "block": block,
        "qber": qber,
        "sifted_bits": 200_000,
        "secret_bits": secret_bits,
        "reconciliation_efficiency": 1.05,
        "mode": "key_derived",
    }


SUMMARY = {"blocks_committed": 2, "keys_match": True, "kme": {"alice": "https://a/"}}


def test_plain_fallback_prints_event_lines_and_summary_lines() -> None:
    out = io.StringIO()  # not a terminal
    progress = Progress()
    with DemoDisplay(out, target_blocks=3) as display:
        assert display.is_live is False
        display.update(progress, progress.feed({"event": "auth.mode", "mode": "certificate"}))
        display.update(progress, progress.feed(committed(1, 0.012, 40_000)))
        display.update(progress, None)
        display.message("delivery API: 8 keys")
        display.final_table(SUMMARY)
    lines = out.getvalue().splitlines()
    assert lines[0] == "authentication mode: certificate"
    assert lines[1].startswith("block 1: committed, QBER 1.20 %")
    assert lines[2] == "delivery API: 8 keys"
    assert "  blocks_committed: 2" in lines and "  keys_match: True" in lines
    assert "\x1b[" not in out.getvalue()  # no terminal escapes in a pipe


def test_live_view_shows_progress_and_a_final_table() -> None:
    out = io.StringIO()
    progress = Progress()
    clock = [progress.started_s + 10.0]
    with DemoDisplay(out, target_blocks=4, live=True, clock=lambda: clock[0]) as display:
        assert display.is_live
        display.update(progress, progress.feed(committed(1, 0.012, 40_000)))
        display.update(progress, progress.feed(committed(2, 0.014, 60_000)))
        display.update(
            progress,
            progress.feed({"event": "block.aborted", "block": 3, "reason": "qber_above_threshold"}),
        )
        console = display.console
        with console.capture() as capture:
            console.print(display.render(progress))
        panel = capture.get()
        display.final_table(SUMMARY)
    assert "3 / 4 block attempts" in panel
    assert "2 committed, 1 aborted (qber_above_threshold 1)" in panel
    assert "100,000 bits, 10,000 bit/s" in panel  # 100 kbit over 10 s
    assert "1.40 % (mean 1.30 %)" in panel
    assert "block 3: aborted" in panel
    text = out.getvalue()
    assert "qkdnode demo summary" in text and "alice: https://a/" in text
