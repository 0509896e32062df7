#!/usr/bin/env bash
# Optimum ONNX for bench/onnx_generate.py, in its own venv: optimum-onnx 0.1.0 (the newest found) pins
# optimum~=2.1.0 and transformers<4.58, while mmaccel's venv runs transformers 5.x. Installing it there would
# downgrade transformers, so it lives in bench/.optimum-venv (git-ignored), which reuses the main venv's torch,
# numpy and onnxruntime through a .pth file (appended after its own site-packages, so its transformers 4.57 wins).
# bench/onnx_generate.py runs bench/optimum_peer.py with this venv's python; without it Optimum's rows say
# "not installed".    Usage: ./bench/setup_optimum_venv.sh   (from the repository root, main venv built)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
main_site="$("$root/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
python3 -m venv "$root/bench/.optimum-venv"
peer_site="$("$root/bench/.optimum-venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$main_site" > "$peer_site/mmaccel_main_venv.pth"
"$root/bench/.optimum-venv/bin/pip" install -q "optimum-onnx==0.1.0" "optimum==2.1.0" "transformers==4.57.6"
