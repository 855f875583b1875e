"""The three-node relay simulation: many seeds with faults, a crash at every event boundary of
a relay, and mutant machines whose broken invariant the checker must catch."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qkdnode.relay.events import (
    Effect,
    Input,
    PadSpend,
    RelayState,
    SaveRelay,
    SendRelay,
)
from qkdnode.relay.machine import RelayMachine
from qkdnode.simulation.relay_cli import main as simulate_relay_main
from qkdnode.simulation.relay_cli import relay_row
from qkdnode.simulation.relay_settings import RelayRunReport, RelaySimSettings
from qkdnode.simulation.relay_world import crash_at_every_boundary, simulate_relay_run

# ---- random runs ---------------------------------------------------------------------------------


def _summed(reports: list[RelayRunReport]) -> dict[str, Any]:
    return relay_row(reports, 0.0)


def test_a_short_simulation_breaks_no_invariant_and_reaches_every_outcome() -> None:
    reports = [simulate_relay_run(seed) for seed in range(300)]
    assert [v for r in reports for v in r.violations] == []
    row = _summed(reports)
    assert row["relays_started"] > 3000
    assert row["relays_committed"] > 0.8 * row["relays_started"]
    assert row["relays_aborted"] > 100 and row["tag_mismatch_aborts"] > 30
    assert row["relays_committed"] + row["relays_aborted"] == row["relays_started"]
    assert row["crashes"] > 1000 and row["crashes_between_effects"] > 100
    assert row["refused_at_request"] > 0 and row["keys_handed_out"] > 1000
    # exactly one pad bit per relayed bit per hop, every hop of every relay counted
    assert row["pad_bits_allocated"] == row["payload_bits_relayed"] > 0
    assert row["hop_allocations"] > row["relays_started"]


def test_a_seed_replays_exactly() -> None:
    first = simulate_relay_run(42, trace=True)
    again = simulate_relay_run(42, trace=True)
    assert first.trace == again.trace and len(first.trace) > 100


@pytest.mark.slow
def test_a_longer_simulation_breaks_no_invariant() -> None:
    reports = [simulate_relay_run(seed) for seed in range(300, 2300)]
    assert [v for r in reports for v in r.violations] == []
    assert _summed(reports)["relays_committed"] > 20_000


# ---- a crash at every boundary -------------------------------------------------------------------


@pytest.mark.parametrize("abort", [False, True], ids=["committed", "aborted"])
@pytest.mark.parametrize("route", [("A", "R", "C"), ("C", "R", "A"), ("A", "R")], ids="-".join)
def test_a_crash_at_every_event_boundary_leaves_the_same_outcome_everywhere(
    abort: bool, route: tuple[str, ...]
) -> None:
    reports = crash_at_every_boundary(route, abort=abort, seed=7)
    clean, crashed = reports[0], reports[1:]
    assert clean.events > 4 * (len(route) - 1)  # at least every message of the relay
    assert len(crashed) == clean.events * len(route)
    assert [v for r in reports for v in r.violations] == []
    assert all(r.crashes == 1 for r in crashed)
    outcome = "relays_aborted" if abort else "relays_committed"
    # every run whose origin stored the relay before its crash ends with that outcome
    assert all(getattr(r, outcome) == r.relays_started for r in reports)
    assert sum(r.relays_started for r in crashed) >= len(crashed) - 1


# ---- mutants: the checker catches a broken machine -----------------------------------------------


class _Mutant(RelayMachine):
    """The production machine with its effects rewritten by ``mutate``."""

    mutate: Callable[[RelayMachine, list[Effect]], list[Effect]]

    def receive(self, event: Input) -> list[Effect]:
        return type(self).mutate(self, super().receive(event))


def _mutant(mutate: Callable[[RelayMachine, list[Effect]], list[Effect]]) -> type[_Mutant]:
    return type("Mutant", (_Mutant,), {"mutate": staticmethod(mutate)})


def _terminal_skips_storing_the_key(machine: RelayMachine, effects: list[Effect]) -> list[Effect]:
    return [
        e
        for e in effects
        if not (isinstance(e, SaveRelay) and e.record.state is RelayState.PREPARED)
    ]


def _sends_before_storing(machine: RelayMachine, effects: list[Effect]) -> list[Effect]:
    sends = [e for e in effects if isinstance(e, SendRelay)]
    return sends + [e for e in effects if not isinstance(e, SendRelay)]


def _origin_forgets_its_allocation(machine: RelayMachine, effects: list[Effect]) -> list[Effect]:
    out: list[Effect] = []
    for effect in effects:
        if isinstance(effect, SaveRelay) and effect.record.state is RelayState.PENDING:
            kept: tuple[PadSpend, ...] = tuple(
                s for s in effect.spends if s.range.peer != effect.record.route[1]
            )
            effect = SaveRelay(record=effect.record, spends=kept)
        out.append(effect)
    return out


@pytest.mark.parametrize(
    ("mutate", "caught"),
    [
        (_terminal_skips_storing_the_key, {"lost", "half_relayed"}),
        (_sends_before_storing, {"lost", "half_relayed"}),
        (_origin_forgets_its_allocation, {"pad_misaccounted", "pad_reused", "protocol_errors"}),
    ],
    ids=["terminal skips a store write", "send before store", "origin forgets its allocation"],
)
def test_the_checker_catches_a_mutant_machine(
    mutate: Callable[[RelayMachine, list[Effect]], list[Effect]], caught: set[str]
) -> None:
    factory = _mutant(mutate)
    # a broken machine may never quiet down: give up sooner than the default
    reports = crash_at_every_boundary(
        ("A", "R", "C"), seed=7, machine_factory=factory, quiet_steps_max=600
    )
    settings = RelaySimSettings(quiet_steps_max=600)
    reports += [simulate_relay_run(s, settings, machine_factory=factory) for s in range(20)]
    kinds = {v.split(":")[0] for r in reports for v in r.violations}
    assert kinds & caught, kinds
    # and the same runs with the production machine break nothing
    honest = crash_at_every_boundary(("A", "R", "C"), seed=7)
    assert [v for r in honest for v in r.violations] == []


# ---- the script ----------------------------------------------------------------------------------


def test_the_script_writes_its_row_and_replays_a_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rows.json"
    status = simulate_relay_main(["--runs", "3", "--seed", "5", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert status == 0 and [r["runs"] for r in rows] == [3]
    assert set(rows[0]) >= {
        "relays_started",
        "relays_committed",
        "delivered_twice",
        "lost",
        "half_relayed",
        "pad_reused",
        "pad_misaccounted",
        "pad_bits_per_relayed_bit",
        "seconds",
    }
    assert "first" not in capsys.readouterr().out
    status = simulate_relay_main(["--boundaries", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert status == 0 and [r["relay"] for r in rows] == ["committed", "aborted"]
