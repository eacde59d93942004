"""``qkv env``: this machine, its PyTorch build and the kernels qkv picks on it, for bug reports.

    qkv env            aligned text: paste it into a bug report
    qkv env --json     the same as JSON

The data come from ``qkv._env.environment_report``; this module only prints them.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["cmd_env", "format_report", "register"]

# Section headings in the text output (the JSON keeps the plain keys).
_TITLES = {
    "qkv": "qkv",
    "cpu": "CPU",
    "torch": "PyTorch",
    "training_precision": "training precision (train.precision=auto)",
    "inference_kernels": "inference kernels (x W^T + b, per weight dtype)",
    "kernel_variables": "environment variables that change kernels",
}


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):  # CPU features: {name: present}
        return " ".join(f"{k}={_value(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    return str(value)


def _lines(entries: dict[str, Any], indent: int) -> list[str]:
    """``key  value`` lines (the JSON's keys), keys padded to one column; a dict of
    non-booleans is a nested block (inference kernels per device, then per dtype)."""
    width = max((len(k) for k in entries), default=0) + 2
    lines: list[str] = []
    for key, value in entries.items():
        nested = isinstance(value, dict) and not all(isinstance(v, bool) for v in value.values())
        if nested:
            lines.append(" " * indent + key)
            lines.extend(_lines(value, indent + 2))
        else:
            lines.append(" " * indent + key.ljust(width) + _value(value))
    return lines


def format_report(report: dict[str, dict[str, Any]]) -> str:
    """The report as aligned text, one heading per section."""
    lines: list[str] = []
    for section, entries in report.items():
        lines.append(_TITLES.get(section, section))
        lines.extend(_lines(entries, 2) if entries else ["  (none)"])
    return "\n".join(lines)


def cmd_env(args: argparse.Namespace) -> int:
    """Print the environment report, as text or JSON."""
    from qkv._env import environment_report

    report = environment_report()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``qkv env`` to the command's subparsers."""
    p = sub.add_parser(
        "env",
        help="print this machine's setup and the kernels qkv picks (attach it to bug reports)",
        description=(
            "Print qkv's, Python's and PyTorch's versions, the CPU and its features, CUDA, "
            "cuDNN, oneDNN and MPS, the precision train.precision=auto picks here, and the "
            "kernel each inference product takes per dtype."
        ),
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_env)
