"""benchmarks/training.py --trainer: the trainer-against-bare-step table, at a toy size."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
NUMBER = r"[-+]?\d+(?:\.\d+)?"


def table(output: str) -> dict[str, dict[str, str]]:
    """The markdown table of ``output``: {run: {column: cell}}."""
    lines = [line for line in output.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, f"no markdown table in the output:\n{output}"
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(header), f"row {line!r} has {len(cells)} cells, not {len(header)}"
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def number(cell: str) -> float:
    """The first number of a cell ("+3.1% (-2.0% to +8.5%)" -> 3.1, "52.24 x 1" -> 52.24)."""
    match = re.match(NUMBER, cell)
    assert match is not None, f"{cell!r} does not start with a number"
    return float(match.group())


def test_trainer_table_has_both_runs_with_numbers(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/training.py", "--trainer", "--trainer-steps", str(STEPS),
         "--tiny", "--threads", "1", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, cwd=ROOT, timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table(result.stdout)
    every = STEPS // 4
    assert list(rows) == ["steps only", f"eval + sample + checkpoint every {every}"]
    for name, row in rows.items():
        assert number(row["timed steps"]) == STEPS - 2, name  # two warm-up steps
        for column in ("bare step, median (ms)", "trainer step, median (ms)",
                       "loop iteration, median (ms)", "loop iteration, mean (ms)"):  # fmt: skip
            assert number(row[column]) > 0, (name, column, row[column])
        overhead = row["step overhead, median of pairs (min to max)"]
        low, high = (float(x) for x in re.findall(rf"({NUMBER})%", overhead)[1:])
        assert low <= number(overhead) <= high, overhead
        bare, trainer = (float(x) for x in row["fastest step, bare / trainer (ms)"].split("/"))
        assert 0 < bare <= number(row["bare step, median (ms)"]), row
        assert 0 < trainer <= number(row["trainer step, median (ms)"]), row
        assert number(row["data (ms/step)"]) > 0 and number(row["logging (ms/step)"]) > 0
    # Evaluation, sample and checkpoint: once at the end alone, after every step at cadence 1.
    for column in ("validation (ms x calls)", "sample (ms x calls)", "checkpoint (ms x calls)"):
        for name, calls in zip(rows, (1, STEPS // every), strict=True):
            seconds, count = rows[name][column].split(" x ")
            assert float(seconds) > 0 and int(count) == calls, (name, column)
    assert "at the preset's own cadence" in result.stdout
    assert re.search(r"load average \(1, 5, 15 min\): before", result.stdout)
