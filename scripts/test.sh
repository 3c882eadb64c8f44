#!/usr/bin/env bash
# The project's test command (README): set up what is missing, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --workspace --locked --features vmm/test-knobs "$@"
