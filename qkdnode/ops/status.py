"""``qkdnode status``: a human summary of a running node, with an exit status for monitors.

It fetches ``/status`` from the node's metrics listener (``[metrics] listen`` of ``--config``,
or ``--url``) and prints, for each link of the node (each peer), peer connection,
authentication mode, pool level against its reserve, age of the last committed block, blocks
committed and aborted, and keys in the store.

Exit status (usable by monitoring and as a systemd ``ExecCondition``/health check):

- 0: healthy;
- 1: degraded or unhealthy: peer not connected, authentication pool below its reserve or
  exhausted, no block committed for ``--max-commit-age-s`` seconds, the last keys' epsilon past
  the security budget, or the quantum link failed;
- 2: usage or configuration error (no ``[metrics] listen`` in the config, bad arguments);
- 3: the node does not answer (stopped), or what answers is not a qkdnode status endpoint.

The health rules live in :func:`health_problems`, shared with the node's own ``/status``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any, Final, TextIO

DEFAULT_MAX_COMMIT_AGE_S: Final = 600.0
DEFAULT_TIMEOUT_S: Final = 5.0
EXIT_HEALTHY: Final = 0
EXIT_UNHEALTHY: Final = 1
EXIT_USAGE: Final = 2
EXIT_NOT_ANSWERING: Final = 3

_REQUIRED: Final[dict[str, type | tuple[type, ...]]] = {
    "node": str,
    "peer_connected": bool,
    "auth_mode": str,
    "pool_level_bits": int,
    "pool_reserve_bits": int,
    "blocks_committed": int,
    "blocks_aborted": int,
    "uptime_s": (int, float),
}


class StatusUnavailable(Exception):
    """The node did not answer, or did not answer as a qkdnode status endpoint."""


def health_problems(summary: Mapping[str, Any], *, max_commit_age_s: float) -> list[str]:
    """What is wrong with a node, from its ``/status`` facts; empty when healthy.

    - the peer session is down;
    - the authentication-key pool is below its reserve once a block has been committed since
      start (a fresh node's pool is empty until its first block, which is expected);
    - no block committed for more than ``max_commit_age_s`` (or none at all in that long since
      start);
    - the authentication-key pool is exhausted (no block opens until an operator acts);
    - the last committed keys' epsilon exceeds the configured security budget;
    - the quantum link reports ``failed``.
    """
    problems: list[str] = []
    if not summary["peer_connected"]:
        problems.append("peer not connected")
    level, reserve = summary["pool_level_bits"], summary["pool_reserve_bits"]
    if summary["blocks_committed"] > 0 and level < reserve:
        problems.append(f"authentication pool below reserve ({level} < {reserve} bits)")
    age = summary.get("last_commit_age_s")
    if age is not None and age > max_commit_age_s:
        problems.append(f"no block committed for {age:.0f} s (limit {max_commit_age_s:g} s)")
    elif age is None and summary["uptime_s"] > max_commit_age_s:
        problems.append(
            f"no block committed in {summary['uptime_s']:.0f} s since start"
            f" (limit {max_commit_age_s:g} s)"
        )
    if summary.get("pool_exhausted"):
        problems.append(
            "authentication pool exhausted: no block opens "
            "(run 'qkdnode auth rebootstrap' on both nodes)"
        )
    epsilon, budget = summary.get("key_epsilon"), summary.get("security_budget_epsilon")
    if isinstance(epsilon, float) and isinstance(budget, float) and epsilon > budget:
        problems.append(f"key epsilon {epsilon:.3g} above the security budget {budget:.3g}")
    if summary.get("link_state") == "failed":
        problems.append("quantum link failed")
    return problems


def validate_summary(value: object) -> dict[str, Any]:
    """The summary if it has the fields and types we rely on; else ``StatusUnavailable``. A
    node with several peers answers ``{"node", "links": [...]}``: each link is checked."""
    if not isinstance(value, dict):
        raise StatusUnavailable("the answer is not a JSON object")
    if "links" in value:
        links = value["links"]
        if not isinstance(value.get("node"), str) or not isinstance(links, list) or not links:
            raise StatusUnavailable("the answer has no valid 'links'")
        for link in links:
            validate_summary(link)
            if "links" in link or not isinstance(link.get("peer"), str):
                raise StatusUnavailable("the answer has a link without a valid 'peer'")
        return value
    for name, kind in _REQUIRED.items():
        field = value.get(name)
        if not isinstance(field, kind) or (kind is int and isinstance(field, bool)):
            raise StatusUnavailable(f"the answer has no valid {name!r}")
    age = value.get("last_commit_age_s")
    if age is not None and (isinstance(age, bool) or not isinstance(age, int | float)):
        raise StatusUnavailable("the answer has no valid 'last_commit_age_s'")
    return value


def fetch_status(url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """GET ``url`` (``http://host:port/status``) and return the validated summary.

    HTTP 200 and 503 both carry the summary (503: the node thinks it is unhealthy).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not an http:// URL: {url}")
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)
    try:
        connection.request("GET", parts.path or "/status")
        response = connection.getresponse()
        body = response.read(1 << 20)
        if response.status not in (200, 503):
            raise StatusUnavailable(f"HTTP {response.status} from {url}")
        try:
            value = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StatusUnavailable(f"not JSON from {url}") from None
        return validate_summary(value)
    except (OSError, http.client.HTTPException) as exc:
        raise StatusUnavailable(f"no answer from {url}: {exc}") from None
    finally:
        connection.close()


def status_url(host: str, port: int) -> str:
    """The ``/status`` URL of a listener bound to host:port (a wildcard means this host)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/status"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "none since start"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def format_summary(summary: Mapping[str, Any], problems: Sequence[str]) -> str:
    """The human summary printed by ``qkdnode status``."""
    keys = summary.get("keys") or {}
    reasons = summary.get("abort_reasons") or {}
    reason_text = (
        " (" + ", ".join(f"{name} {count}" for name, count in sorted(reasons.items())) + ")"
        if reasons
        else ""
    )
    qber = summary.get("last_qber")
    epsilon = summary.get("key_epsilon")
    lines = [
        f"node {summary['node']} ({summary.get('role', '?')}), peer {summary.get('peer', '?')}: "
        + ("healthy" if not problems else "UNHEALTHY"),
        f"  peer connected:   {'yes' if summary['peer_connected'] else 'NO'}",
        f"  auth mode:        {summary['auth_mode']}",
        f"  auth pool:        {summary['pool_level_bits']} bits"
        f" (reserve {summary['pool_reserve_bits']}, target {summary.get('pool_target_bits', '?')})",
        f"  last block:       {_age(summary.get('last_commit_age_s'))}",
        f"  blocks:           {summary['blocks_committed']} committed,"
        f" {summary['blocks_aborted']} aborted{reason_text}",
        f"  last QBER:        {'-' if qber is None else f'{100 * qber:.2f} %'}",
        f"  key epsilon:      {'-' if epsilon is None else f'{epsilon:.3g}'}"
        f" (budget {summary.get('security_budget_epsilon', '?')})",
        f"  key rate:         {summary.get('secret_key_rate_bits_per_second', 0.0):,.0f} bit/s",
        f"  keys available:   {keys.get('available', '?')}"
        f" (reserved {keys.get('reserved', '?')}, delivered {keys.get('delivered', '?')})",
        f"  link:             {summary.get('link_state') or '?'}",
        f"  uptime:           {summary['uptime_s']:.0f} s",
    ]
    lines.extend(f"  problem: {problem}" for problem in problems)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkdnode status", description="Summarise a running node; exit 0 if healthy."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="the node's TOML file (uses [metrics] listen)")
    source.add_argument("--url", help="the node's status URL, e.g. http://127.0.0.1:9100/status")
    parser.add_argument(
        "--max-commit-age-s",
        type=float,
        default=DEFAULT_MAX_COMMIT_AGE_S,
        help="unhealthy when no block was committed for this long (default 600)",
    )
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S)
    parser.add_argument("--json", action="store_true", help="print the raw JSON summary")
    return parser


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run ``qkdnode status``; returns the exit status (0, 1, 2 or 3, see the module doc)."""
    out = sys.stdout if out is None else out
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.url is not None:
        url = args.url if urllib.parse.urlsplit(args.url).path else args.url + "/status"
    else:
        from qkdnode.config import load_config
        from qkdnode.errors import QkdError

        try:
            config = load_config(args.config)
        except (QkdError, OSError) as exc:
            print(f"qkdnode status: configuration error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if config.metrics_listen is None:
            print(
                f"qkdnode status: {args.config} has no [metrics] listen: nothing to ask",
                file=sys.stderr,
            )
            return EXIT_USAGE
        url = status_url(*config.metrics_listen)
    try:
        summary = fetch_status(url, timeout_s=args.timeout_s)
    except ValueError as exc:
        print(f"qkdnode status: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StatusUnavailable as exc:
        print(f"qkdnode status: node not answering: {exc}", file=out)
        return EXIT_NOT_ANSWERING
    links: list[dict[str, Any]] = summary.get("links", [summary])
    per_link = [health_problems(link, max_commit_age_s=args.max_commit_age_s) for link in links]
    if "links" in summary:  # several peers: each problem names its link
        problems: list[str] = []
        for link, found in zip(links, per_link, strict=True):
            link |= {"problems": found, "healthy": not found}
            problems.extend(f"{link['peer']}: {problem}" for problem in found)
    else:
        problems = per_link[0]
    if args.json:
        print(json.dumps(summary | {"problems": problems, "healthy": not problems}), file=out)
    else:
        text = "\n".join(
            format_summary(link, found) for link, found in zip(links, per_link, strict=True)
        )
        print(text, file=out)
    return EXIT_UNHEALTHY if problems else EXIT_HEALTHY


if __name__ == "__main__":
    raise SystemExit(main())
