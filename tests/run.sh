#!/usr/bin/env bash
# Sets up .venv with everything the tests need (editors included, where provisioning exists),
# lints and type-checks, and runs the test suite. Arguments go to pytest.
#
# With CI set, or with --min-deps as the first argument, the suite then runs once more in
# .venv-min against the lowest versions pyproject.toml allows (tests/constraints-min.txt), so a
# dependency floor cannot lie; the editor and GPU tests are left out of that run. --min-deps
# runs only that second part.
set -euo pipefail
cd "$(dirname "$0")/.."

min_deps_only=0
if [ "${1:-}" = "--min-deps" ]; then
  min_deps_only=1
  shift
fi

# The lint and type checks the test command runs; the same in both environments.
lint() {
  "$1/bin/ruff" check --cache-dir "$1/.ruff_cache"
  "$1/bin/mypy" --cache-dir "$1/.mypy_cache"
}

if [ "$min_deps_only" = 0 ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r tests/requirements-ci.txt -e '.[diffusion,test,pool]'
  lint .venv
  if [ -f tests/editors/provision.sh ]; then
    bash tests/editors/provision.sh
  fi
  if [ -z "${CI:-}" ]; then
    exec .venv/bin/python -m pytest "$@"
  fi
  .venv/bin/python -m pytest "$@"
fi

echo "run.sh: the suite again, on the lowest allowed versions (tests/constraints-min.txt)" >&2
started=$SECONDS
python3 -m venv .venv-min
.venv-min/bin/python -m pip install -q --upgrade pip
.venv-min/bin/python -m pip install -q -c tests/constraints-min.txt -e '.[diffusion,test,pool]'
lint .venv-min
# pytest exits 5 when it collects nothing; set -e fails the script on it, as on any failure.
.venv-min/bin/python -m pytest -m "not slow and not gpu" \
  --ignore=tests/test_krita.py --ignore=tests/test_gimp.py "$@"
echo "run.sh: lowest versions: passed in $((SECONDS - started)) s" >&2
