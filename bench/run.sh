#!/usr/bin/env bash
# Run the shared peer benchmark (../shared/bench/peers) with utesla-node as one more peer.
#
#   bash bench/run.sh --quick                      # D=2 s, 16 MiB bulk: 2+ min (waits for quiet)
#   bash bench/run.sh --repeat 3                   # full, 3 rounds (medians + spread)
#   bash bench/run.sh --quick --peers floor,pyro5 --workloads hello,connect
#
# Every argument goes to run.py (see its --help).  The peers get a virtual environment of
# their own, .peers-venv at the repository root (created on first use: the pinned peer
# requirements plus this project, editable).  Results: bench/results/<time>.jsonl and .md.
# The shared folder is looked up beside the checkout (../shared); UTESLA_SHARED overrides.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
SHARED="${UTESLA_SHARED:-$(dirname "$REPO")/shared}"
PEERS="$SHARED/bench/peers"
if [ ! -f "$PEERS/run.py" ]; then
    echo "error: $PEERS/run.py not found (set UTESLA_SHARED to the shared folder)" >&2
    exit 2
fi

VENV="$REPO/.peers-venv"
if [ ! -x "$VENV/bin/python" ]; then
    echo "# creating $VENV" >&2
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import grpc, Pyro5, msgpack, Crypto, cryptography, uvloop, utesla_node" \
        2>/dev/null; then
    echo "# installing the peers' requirements and this project into $VENV" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$PEERS/requirements.txt"
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$REPO"
fi

mkdir -p "$HERE/results"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
export UTESLA_PEERS_DIR="$PEERS"
cd "$REPO"
exec "$VENV/bin/python" "$PEERS/run.py" --peer "utesla=$HERE/peer_utesla.py" \
    --out "$HERE/results/peers-$STAMP.jsonl" --md "$HERE/results/peers-$STAMP.md" "$@"
