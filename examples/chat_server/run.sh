#!/usr/bin/env bash
# Start the FlexPipe chat server on the built-in model and print its URL.
#   examples/chat_server/run.sh                 # http://127.0.0.1:8000/
#   examples/chat_server/run.sh --port 9000 --stages 3 --api-key secret
# Every flag of `flexpipe serve --help` works here, as do FLEXPIPE_* variables and --config FILE.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
[ -x "$py" ] || py=python3
cd "$root"
exec "$py" -m flexpipe.cli serve "$@"
