"""The ``qkdnode`` command: run a node, manage its PKI, run the two-node demo, emulate a device.

Exit status: 0 on success (and on a clean stop by SIGTERM/SIGINT), 2 for a configuration error
(the message names the file, the dotted key and what was expected), 1 for anything fatal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qkdnode.demo.bootstrap import BOOTSTRAPS, WEB_OF_TRUST_INTRODUCERS, WEB_OF_TRUST_THRESHOLD
from qkdnode.errors import ConfigError, KeyStoreError, QkdError


def _note_stop_signals() -> list[int]:
    """From now on SIGTERM/SIGINT are noted, not fatal; returns the list they are noted in.

    Without this a stop request during start-up (imports, config, self-tests) or after the event
    loop's own receiver is gone (clean-up) would kill the process by the default disposition,
    without a log line and with a signal exit status.
    """
    import signal

    noted: list[int] = []

    def note(signum: int, _frame: object) -> None:
        noted.append(signum)

    signal.signal(signal.SIGTERM, note)
    signal.signal(signal.SIGINT, note)
    # SIGHUP asks to reopen the log: before the loop runs (and after) there is nothing to
    # reopen, and its default disposition would kill the node
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return noted


def _cmd_run(args: argparse.Namespace) -> int:
    early_stops = _note_stop_signals()
    import faulthandler

    faulthandler.enable()  # a fatal signal (SIGSEGV, SIGABRT, ...) leaves its traceback on stderr
    import structlog
    import trio

    from qkdnode.config import load_config
    from qkdnode.node.auditing import leaf_exceptions
    from qkdnode.node.daemon import DaemonMustStop, run_daemon
    from qkdnode.ops.logging import configure_logging, reopen_log_output
    from qkdnode.ops.selftest import run_self_tests

    config = load_config(args.config)
    configure_logging(
        level=config.logging.level,
        fmt=config.logging.format,
        file=config.logging.file,
        node=config.node.name,
        # with several peers each link's tasks bind their own (qkdnode.node.daemon)
        peer=None if config.several_peers else config.peer.name,
    )
    # known-answer tests of every primitive the node relies on; a failure stops start-up
    passed = run_self_tests()
    structlog.get_logger("qkdnode.node").info("daemon.self_tests", passed=passed)
    fatal: list[BaseException] = []
    misconfigured: list[BaseException] = []
    try:
        return trio.run(
            lambda: run_daemon(config, on_reopen=reopen_log_output, early_stops=early_stops)
        )
    except* (DaemonMustStop, KeyStoreError) as group:
        fatal.extend(group.exceptions)
    except* ConfigError as group:  # a file the config names does not load (a stale CRL, ...)
        misconfigured.extend(leaf_exceptions(group))
    for error in misconfigured:
        print(f"qkdnode: configuration error: {error}", file=sys.stderr)
    for error in fatal:
        print(f"qkdnode: stopping: {error}", file=sys.stderr)
    return 2 if misconfigured and not fatal else 1


def _cmd_pki(args: argparse.Namespace) -> int:
    from qkdnode.ops import issuance

    directory = Path(args.dir)
    if args.pki_command == "init":
        files = issuance.init_ca(directory, common_name=args.name, algorithm=args.algorithm)
        print(f"CA certificate {files.certificate}, key {files.private_key} (mode 0600)")
        return 0
    if args.pki_command == "crl":
        path = issuance.issue_crl(
            directory,
            tuple(Path(p) for p in args.revoke),
            out=Path(args.out) if args.out else None,
            validity_days=args.days,
        )
        print(f"CRL {path}: {len(args.revoke)} revoked, next update in {args.days:g} days")
        return 0
    out = Path(args.out) if args.out else directory / args.name
    files = issuance.issue_certificate(
        directory,
        args.name,
        out,
        purpose=args.kind,
        algorithm=args.algorithm,
        hosts=tuple(args.host) if args.host else ("localhost", "127.0.0.1"),
        validity_days=args.days,
    )
    print(f"{args.kind} certificate {files.certificate}, key {files.private_key} (mode 0600)")
    return 0


def _cmd_pgp(args: argparse.Namespace) -> int:
    from qkdnode.ops import pgp

    if args.pgp_command == "init":
        files = pgp.init_node_key(
            Path(args.dir), name=args.name, user_id=args.user_id, valid_days=args.valid_days
        )
        print(
            f"OpenPGP certificate {files.certificate} ({files.user_id!r}, fingerprint "
            f"{files.fingerprint}), secret key {files.secret_key} (mode 0600)"
        )
        return 0
    fingerprint = pgp.vouch(
        introducer_secret=Path(args.introducer),
        peer_certificate=Path(args.cert),
        name=args.name,
        out=Path(args.out),
    )
    print(f"certified 'qkdnode node {args.name}' on {fingerprint}: {args.out}")
    return 0


def _operator_name() -> str | None:
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return None


def _cmd_auth(args: argparse.Namespace) -> int:
    import time

    from qkdnode.config import load_config
    from qkdnode.node import rebootstrap

    config = load_config(args.config)
    from qkdnode.audit import AuditKind
    from qkdnode.store.audit import record_in_store

    # the permit is per link: it lives in that link's store directory
    if args.peer is not None:
        link = config.peer_named(args.peer)
    elif config.several_peers:
        names = ", ".join(link.name for link in config.peers)
        print(
            f"qkdnode: {config.file} has several peers ({names}): name the link to "
            "re-bootstrap with --peer NAME",
            file=sys.stderr,
        )
        return 2
    else:
        link = config.peers[0]
    directory = link.store_directory
    now_s = time.time()
    path = rebootstrap.grant(directory, now_s=now_s, valid_s=args.valid_minutes * 60.0)
    record_in_store(
        directory,
        AuditKind.REBOOTSTRAP_PERMIT_GRANTED,
        {"expires_at_s": now_s + args.valid_minutes * 60.0, "user": _operator_name()},
        time_s=now_s,
    )
    towards = f" towards {link.name}" if config.several_peers else ""
    print(
        f"re-bootstrap permit for {config.node.name}{towards}: {path}, valid "
        f"{args.valid_minutes:g} min for one bootstrap session; the peer node needs its own "
        "permit. Both authentication-key ledgers are reset in that session, authenticated by "
        "the bootstrap credentials."
    )
    return 0


def _audit_line(item: dict[str, object]) -> str:
    """One entry of ``audit show`` as a line: number, UTC time, kind, fields."""
    import datetime

    if "error" in item:
        return f"{item['seq']:>6}  UNREADABLE: {item['error']}"
    time_s = item["time_s"]
    assert isinstance(time_s, float)
    when = datetime.datetime.fromtimestamp(time_s, tz=datetime.UTC).isoformat(timespec="seconds")
    fields = item["fields"]
    assert isinstance(fields, dict)
    details = " ".join(
        f"{name}={','.join(value) if isinstance(value, list | tuple) else value}"
        for name, value in sorted(fields.items())
    )
    return f"{item['seq']:>6}  {when}  {item['kind']:<28} {details}"


def _cmd_audit(args: argparse.Namespace) -> int:
    """``audit verify``: exit 0 if the trail verifies, 1 naming the first bad entry, 2 when the
    initial key is not at hand (and not waived). ``audit show``: the entries, unverified."""
    import json

    from qkdnode.audit import verify_trail
    from qkdnode.errors import AuditTrailBroken
    from qkdnode.store.audit import (
        INITIAL_KEY_FILE,
        read_initial_key,
        read_peer_head,
        read_trail,
    )

    directory = Path(args.store)
    try:
        trail = read_trail(directory)
    except AuditTrailBroken as exc:
        print(f"audit trail of {directory}: BROKEN at entry {exc.seq}: {exc.reason}")
        return 1
    if args.audit_command == "show":
        entries = []
        for record in trail.records:
            try:
                entry = record.entry()
                item: dict[str, object] = {
                    "seq": record.seq,
                    "time_s": entry.time_s,
                    "kind": entry.kind,
                    "fields": dict(entry.fields),
                }
            except AuditTrailBroken as exc:
                item = {"seq": record.seq, "error": exc.reason}
            item["chain_hash"] = record.chain_hash.hex()
            entries.append(item)
        if args.json:
            print(json.dumps(entries, indent=2, default=list))
        else:
            for item in entries:
                print(_audit_line(item))
        return 0
    key_path = Path(args.initial_key) if args.initial_key else directory / INITIAL_KEY_FILE
    initial_key: bytes | None = None
    if not args.no_initial_key:
        try:
            initial_key = read_initial_key(key_path)
        except (OSError, ValueError) as exc:
            print(
                f"qkdnode: audit verify needs the trail's initial key ({exc}); give it with "
                "--initial-key FILE, or check the chain alone with --no-initial-key",
                file=sys.stderr,
            )
            return 2
    peer_head = read_peer_head(Path(args.peer_store)) if args.peer_store else None
    if args.peer_store and peer_head is None:
        print(f"qkdnode: {args.peer_store} holds no head of the peer's trail", file=sys.stderr)
        return 2
    try:
        summary = verify_trail(
            trail.records, initial_key=initial_key, stored_state=trail.state, peer_head=peer_head
        )
    except AuditTrailBroken as exc:
        print(f"audit trail of {directory}: BROKEN at entry {exc.seq}: {exc.reason}")
        return 1
    checks = ["chain", "tags under the initial key" if summary.tags_checked else "NO tags"]
    if summary.peer_head_checked:
        checks.append("the head the peer received")
    print(
        f"audit trail of {directory}: {summary.entries} entries verify"
        f" ({', '.join(checks)}); head {summary.head.hex()}"
    )
    return 0


def _cmd_link(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import trio

    from qkdnode.config import SimulatedLinkConfig, load_config
    from qkdnode.link.recorder import record_simulated

    config = load_config(args.config)
    link = config.link
    if not isinstance(link, SimulatedLinkConfig):
        raise ConfigError(
            "link.backend", '"simulated" (the recorder runs the simulated link)', file=args.config
        )
    if args.blocks < 1:
        print("qkdnode: --blocks must be at least 1", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(8), "little")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"qkdnode: {out} is not empty: choose a new directory", file=sys.stderr)
        return 2
    manifest = trio.run(
        lambda: record_simulated(
            link,
            blocks=args.blocks,
            pulse_count=config.postprocess.block_pulses,
            out=out,
            seed=seed,
        )
    )
    detections = sum(block.detections for block in manifest.blocks)
    print(
        f"recorded {len(manifest.blocks)} blocks of {manifest.pulses_per_block} pulses "
        f"({detections} detections, seed {seed}) in {out}"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.topology == "chain":
        from qkdnode.demo.chain import run_chain_demo

        if args.nodes < 3:
            raise SystemExit("qkdnode demo: --topology chain needs --nodes 3 or more")
        if args.eve or args.keep_running or args.bootstrap != "pki" or args.vouches is not None:
            raise SystemExit(
                "qkdnode demo: --topology chain runs with pre-shared keys per link and "
                "without --eve, --keep-running, --bootstrap or --vouches"
            )
        return run_chain_demo(args)
    from qkdnode.demo.run import run_demo

    return run_demo(args)


def _cmd_device_emulator(args: argparse.Namespace, rest: list[str]) -> int:
    from qkdnode.link.emulator import main as emulator_main

    return emulator_main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkdnode", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a node from its TOML config")
    run.add_argument("--config", required=True, help="the node's TOML file")

    pki = commands.add_parser("pki", help="make a CA and certificates for nodes and SAEs")
    pki_commands = pki.add_subparsers(dest="pki_command", required=True)
    init = pki_commands.add_parser("init", help="create a CA (ca.pem, ca.key) in --dir")
    init.add_argument("--dir", required=True)
    init.add_argument("--name", default="qkdnode CA")
    init.add_argument("--algorithm", choices=("ed25519", "ml-dsa-65"), default="ed25519")
    issue = pki_commands.add_parser("issue", help="issue a node or SAE certificate")
    issue.add_argument("kind", choices=("node", "sae"))
    issue.add_argument("name", help="node name or SAE ID (the certificate's CN)")
    issue.add_argument("--dir", required=True, help="the CA directory")
    issue.add_argument("--out", help="output prefix (default: DIR/NAME): PREFIX.pem, PREFIX.key")
    issue.add_argument(
        "--algorithm",
        choices=("ed25519", "ml-dsa-65", "ecdsa-p256"),
        default=None,
        help="default: ed25519 for nodes, ecdsa-p256 for SAEs",
    )
    issue.add_argument("--host", action="append", help="SAN host name or address (repeatable)")
    issue.add_argument("--days", type=int, default=825)
    crl = pki_commands.add_parser(
        "crl", help="write the CA's revocation list (DIR/crl.pem) listing --revoke certificates"
    )
    crl.add_argument("--dir", required=True, help="the CA directory")
    crl.add_argument("--revoke", action="append", default=[], help="a certificate's PEM file")
    crl.add_argument("--out", help="the CRL file (default: DIR/crl.pem)")
    crl.add_argument("--days", type=float, default=7.0, help="days until its nextUpdate")

    pgp = commands.add_parser("pgp", help="OpenPGP keys and vouches for the web-of-trust bootstrap")
    pgp_commands = pgp.add_subparsers(dest="pgp_command", required=True)
    pgp_init = pgp_commands.add_parser(
        "init", help="make an Ed25519 OpenPGP key: DIR/NAME.asc, DIR/NAME.secret.asc (mode 0600)"
    )
    pgp_init.add_argument("--name", required=True, help="node name (user ID 'qkdnode node NAME')")
    pgp_init.add_argument("--dir", required=True)
    pgp_init.add_argument("--user-id", help="another user ID instead, e.g. for an introducer")
    pgp_init.add_argument("--valid-days", type=int, help="key expiry (default: never)")
    pgp_vouch = pgp_commands.add_parser(
        "vouch", help="certify a peer's user ID 'qkdnode node NAME' as a trusted introducer"
    )
    pgp_vouch.add_argument("--introducer", required=True, help="the introducer's secret key")
    pgp_vouch.add_argument("--cert", required=True, help="the peer's OpenPGP certificate")
    pgp_vouch.add_argument("--name", required=True, help="the peer's node name")
    pgp_vouch.add_argument("--out", required=True, help="where to write the certified certificate")

    auth = commands.add_parser("auth", help="operator actions on the node's authentication")
    auth_commands = auth.add_subparsers(dest="auth_command", required=True)
    again = auth_commands.add_parser(
        "rebootstrap",
        help="allow one bootstrap-authenticated session that resets the authentication-key "
        "ledger (run on both nodes)",
    )
    again.add_argument("--config", required=True, help="the node's TOML file")
    again.add_argument("--valid-minutes", type=float, default=60.0)
    again.add_argument(
        "--peer", help="the link to re-bootstrap, by its peer's name (required with several peers)"
    )

    audit = commands.add_parser("audit", help="check or print the node's audit trail")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify",
        help="check every entry (exit 0 valid, 1 naming the first bad entry)",
    )
    verify.add_argument("--store", required=True, help="the node's store directory")
    verify.add_argument(
        "--initial-key",
        help="the trail's initial key file (default: STORE/audit-initial-key)",
    )
    verify.add_argument(
        "--no-initial-key",
        action="store_true",
        help="check the chain and numbering only (a forger who rewrites the chain is missed)",
    )
    verify.add_argument(
        "--peer-store",
        help="the peer node's store directory: check the head of this trail it received",
    )
    show = audit_commands.add_parser("show", help="print the entries (not verified)")
    show.add_argument("--store", required=True, help="the node's store directory")
    show.add_argument("--json", action="store_true", help="one JSON list on stdout")

    link = commands.add_parser("link", help="quantum-link tools")
    link_commands = link.add_subparsers(dest="link_command", required=True)
    record = link_commands.add_parser(
        "record",
        help="record the simulated link of a node's config for the replay backend "
        "(test only: a recording holds both sides' raw bits)",
    )
    record.add_argument("--config", required=True, help="a node's TOML file (simulated link)")
    record.add_argument("--blocks", type=int, required=True, help="blocks of block_pulses")
    record.add_argument("--out", required=True, help="a new (or empty) directory")
    record.add_argument("--seed", type=int, help="the simulator's seed (default: random)")

    demo = commands.add_parser("demo", help="run Alice and Bob on loopback and show keys grow")
    demo.add_argument(
        "--topology",
        choices=("pair", "chain"),
        default="pair",
        help="pair: Alice and Bob; chain: --nodes nodes in a line, keys relayed end to end",
    )
    demo.add_argument("--nodes", type=int, default=3, help="chain: how many nodes (>= 3)")
    demo.add_argument(
        "--relay-keys", type=int, default=4, help="chain: keys relayed each way at the end"
    )
    demo.add_argument(
        "--blocks",
        type=int,
        default=6,
        help="stop after N block attempts (chain: once every link committed N blocks)",
    )
    demo.add_argument("--distance-km", type=float, default=25.0)
    demo.add_argument("--eve", type=float, default=0.0, help="intercept-resend fraction")
    demo.add_argument(
        "--decoys",
        type=int,
        choices=(1, 2),
        default=2,
        help="decoy intensities besides the signal: 2 (decoy and vacuum) or 1 (one-decoy BB84)",
    )
    demo.add_argument("--workdir", help="keep configs, PKI, stores and logs in this directory")
    demo.add_argument("--keep-running", action="store_true", help="leave the nodes up until Ctrl-C")
    demo.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    demo.add_argument("--block-pulses", type=int, default=None, help="pulses per block")
    demo.add_argument("--timeout-s", type=float, default=600.0, help="give up after this long")
    demo.add_argument(
        "--bootstrap",
        choices=BOOTSTRAPS,
        default="pki",
        help="the trust anchor of the first session: X.509 PKI, pre-shared key, or a web of "
        "trust of OpenPGP keys (3 officers, 2 vouches needed)",
    )
    demo.add_argument(
        "--vouches",
        type=int,
        default=None,
        choices=range(WEB_OF_TRUST_INTRODUCERS + 1),
        metavar="N",
        help="web of trust: how many officers vouch for each node (default: all "
        f"{WEB_OF_TRUST_INTRODUCERS}; below {WEB_OF_TRUST_THRESHOLD} the peer is refused)",
    )

    commands.add_parser(
        "status",
        help="health of a running node (exit 0 healthy, 1 degraded, 3 not answering)",
        add_help=False,
    )
    commands.add_parser(
        "report", help="PNG plots of a node's history and of the link", add_help=False
    )
    commands.add_parser(
        "device-emulator",
        help="emulate a serial QKD device on a pseudo-terminal (see --help of the subcommand)",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["device-emulator"]:
        return _cmd_device_emulator(argparse.Namespace(), argv[1:])
    if argv[:1] == ["status"]:
        from qkdnode.ops.status import main as status_main

        return status_main(argv[1:])
    if argv[:1] == ["report"]:
        from qkdnode.ops.report import main as report_main

        return report_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "pki":
            return _cmd_pki(args)
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "link":
            return _cmd_link(args)
        if args.command == "auth":
            return _cmd_auth(args)
        if args.command == "pgp":
            return _cmd_pgp(args)
        if args.command == "audit":
            return _cmd_audit(args)
    except ConfigError as exc:
        print(f"qkdnode: configuration error: {exc}", file=sys.stderr)
        return 2
    except QkdError as exc:
        print(f"qkdnode: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
