#!/usr/bin/env bash
# Sets up .venv with everything the tests need (editors included, where provisioning exists)
# and runs the test suite. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r tests/requirements-ci.txt -e '.[diffusion,test,pool]'
if [ -f tests/editors/provision.sh ]; then
  bash tests/editors/provision.sh
fi
exec .venv/bin/python -m pytest "$@"
