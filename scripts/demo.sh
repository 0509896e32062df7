#!/usr/bin/env bash
# The main job: compile the tiny VLM with backend="mmaccel" on CPU, generate, compare with eager.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec python -m mmaccel.demo "$@"
