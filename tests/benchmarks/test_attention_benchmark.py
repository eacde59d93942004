"""benchmarks/attention.py runs, and its table has a row of numbers for every implementation."""

from __future__ import annotations

import importlib.util
import multiprocessing
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "attention.py"
SIZES = (128, 256)
CELL = re.compile(r"^([\d,]+(?:\.\d+)?) ms · ([\d,]+) MiB$")


def load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_attention", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def table_rows(stdout: str, title: str) -> dict[str, list[str]]:
    """The rows of the markdown table printed under the line starting with ``title``."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows = {}
    for line in lines[start + 3 :]:  # after the title, the header and the alignment row
        if not line.startswith("|"):
            break
        name, *cells = (c.strip() for c in line.strip("|").split("|"))
        rows[name] = cells
    return rows


@pytest.mark.slow
def test_quick_run_has_a_row_of_numbers_for_every_implementation() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--sizes", ",".join(map(str, SIZES))],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    bench = load_benchmark()
    expected = [i.name for i in bench.IMPLS if bench.why_unavailable(i, "cpu") is None]
    assert {"reference", "sdpa"} <= set(expected)
    rows = table_rows(result.stdout, "float32, fwd+bwd")
    for name in expected:
        assert name in rows, f"no row for {name}:\n{result.stdout}"
        *cells, ratio, error = rows[name]
        assert len(cells) == len(SIZES), rows[name]
        for text in cells:
            match = CELL.match(text)
            assert match, f"{name}: {text!r} is not 'ms · MiB'"
            assert float(match[1].replace(",", "")) > 0, f"{name} took no time: {text!r}"
        assert re.fullmatch(r"[\d.]+x \(T=256\)", ratio), ratio
        difference = float(error.split()[0])
        if name in ("reference", "sdpa", "tiled"):  # exact: float32 rounding only
            assert difference < 1e-4, f"{name} differs from sdpa by {difference}"
    # An implementation that is not registered gets a row that says so, not a crash.
    for impl in bench.IMPLS:
        if impl.name not in expected and not impl.cuda_only:
            assert rows[impl.name][0].startswith("not available"), rows[impl.name]
    advice = table_rows(result.stdout, "Which to use when")
    assert advice["exact, short (T = 256)"][0] in ("reference", "sdpa", "tiled"), advice


def test_a_failing_case_reports_why_instead_of_stopping_the_run() -> None:
    bench = load_benchmark()
    receive, send = multiprocessing.Pipe(duplex=False)
    case = {"impl": "no_such_backend", "t": 8, "dtype": "float32", "pass_": "forward",
            "device": "cpu", "repeat": 1, "threads": 0}  # fmt: skip
    bench.child(send, case)  # in this process: the same code a case's process runs
    report = receive.recv()
    assert report["status"] == "failed"
    assert "no_such_backend" in report["note"], report
    assert bench.cell(report).startswith("failed: ValueError")


def test_memory_formula_skips_the_dense_path_only() -> None:
    bench = load_benchmark()
    gib = 2**30
    # One (B, H, T, T) float32 tensor at B=1, H=8, T=16384 is 8 GiB; the reference forms several.
    assert bench.needs_bytes("reference", 16384, torch.float32) > 3 * 8 * gib
    for name in ("sdpa", "block_sparse"):  # no (T, T) tensor at all
        assert bench.needs_bytes(name, 16384, torch.float32) < gib, name
    for name in ("tiled", "linear", "performer"):  # the dispatcher's (T, T) boolean causal mask
        assert bench.needs_bytes(name, 16384, torch.float32) >= 16384**2, name
