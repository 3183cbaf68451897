#!/usr/bin/env bash
# Create (once) a venv holding django-oauth-toolkit for tests/oauth_server/server.py.
# Usage: setup.sh VENV_DIR        Idempotent and safe to run concurrently.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
venv=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}

ready() { "$venv/bin/python" -c "import oauth2_provider" >/dev/null 2>&1; }

ready && exit 0

mkdir -p "$(dirname "$venv")"
# Serialise concurrent callers (e.g. parallel test binaries); the loser re-checks.
exec 9>"$venv.lock"
flock 9
ready && exit 0

# The system python may be Debian's externally-managed one, so a venv is required.
if ! "$python" -m venv "$venv"; then
    echo "setup.sh: '$python -m venv' failed. On Debian/Ubuntu install the python3-venv" \
         "package (apt-get install python3-venv) which provides ensurepip." >&2
    exit 1
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"
ready || { echo "setup.sh: oauth2_provider still not importable in $venv" >&2; exit 1; }
