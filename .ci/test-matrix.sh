#!/usr/bin/env bash
# The test suite on several (Python, torch) pairs, each in a venv of its own; `make test-matrix`
# calls it with the lowest and the highest pair that pyproject.toml claims. CI does not run it.
#
# usage: .ci/test-matrix.sh PYTHON TORCH [PYTHON TORCH ...]
#   PYTHON  an interpreter, as a command or a path (python3.10, ~/.pyenv/versions/3.10.13/bin/python)
#   TORCH   an exact torch release (2.6.0), installed as torch==TORCH before qkv
# environment:
#   MATRIX_DIR         where the venvs go (default .venv-matrix): one per pair, py3.10-torch2.6.0
#   MATRIX_TORCH_ARGS  more pip arguments for the torch install, e.g. "--index-url <CPU wheel index>"
#                      (without one, pip takes PyPI's CUDA build: ~1 GB plus several GB of nvidia-*)
#   MATRIX_PYTEST      the test command after `python -m pytest`
#
# Each pair's output goes to MATRIX_DIR/<pair>.log; a table of the results ends the run, and the
# exit status is non-zero when any pair failed to install or to pass.
set -uo pipefail
cd "$(dirname "$0")/.."

dir=${MATRIX_DIR:-.venv-matrix}
pytest_args=${MATRIX_PYTEST:--n 2 --doctest-modules src/qkv tests}
if (( $# == 0 || $# % 2 )); then
    echo "usage: $0 PYTHON TORCH [PYTHON TORCH ...]" >&2
    exit 2
fi
mkdir -p "$dir"

rows=()
status=0
run_pair() {  # PYTHON TORCH: install into the pair's venv, run the suite, add a row to the table
    local py=$1 torch=$2 version venv log pip actual result summary start=$SECONDS installed
    if ! version=$("$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null); then
        rows+=("$py|torch $torch|NO PYTHON|0|0|'$py' does not run: set the MATRIX_PY_* variable")
        status=1
        return
    fi
    venv=$dir/py${version%.*}-torch$torch
    log=$venv.log
    pip="$venv/bin/python -m pip --quiet --disable-pip-version-check"
    echo "== Python $version ($py) + torch $torch: $venv, log in $log"
    {
        test -x "$venv/bin/python" || "$py" -m venv "$venv" &&
            $pip install --upgrade pip &&
            # shellcheck disable=SC2086  # MATRIX_TORCH_ARGS is a list of pip arguments
            $pip install "torch==$torch" ${MATRIX_TORCH_ARGS:-} &&
            # The pin again, so that resolving qkv's extras can never move torch.
            echo "torch==$torch" >"$venv/torch-pin.txt" &&
            $pip install --constraint "$venv/torch-pin.txt" -e ".[dev]"
    } >"$log" 2>&1
    if (( $? )); then
        rows+=("$version|torch $torch|INSTALL FAILED|$((SECONDS - start))|0|$(tail -n 1 "$log")")
        status=1
        return
    fi
    installed=$SECONDS
    actual=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
    # shellcheck disable=SC2086  # pytest_args is a list of arguments
    "$venv/bin/python" -m pytest $pytest_args 2>&1 | tee -a "$log"
    if (( PIPESTATUS[0] )); then result=FAILED; status=1; else result=passed; fi
    # pytest's closing line: "==== 3 failed, 812 passed, 5 skipped in 151.20s (0:02:31) ===="
    summary=$(grep -E '^=+ .*(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' "$log" |
        tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
    rows+=("$version|torch $actual|$result|$((installed - start))|$((SECONDS - installed))|${summary:-see $log}")
}

while (( $# )); do
    run_pair "$1" "$2"
    shift 2
done

minutes() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
echo
printf '%-8s  %-18s  %-14s  %-7s  %-7s  %s\n' python torch result install tests summary
for row in "${rows[@]}"; do
    IFS='|' read -r python torch result install tests summary <<<"$row"
    printf '%-8s  %-18s  %-14s  %-7s  %-7s  %s\n' "$python" "$torch" "$result" \
        "$(minutes "$install")" "$(minutes "$tests")" "$summary"
done
exit "$status"
