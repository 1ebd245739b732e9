#!/bin/sh
# Install dictionary_learning 0.1.0, the peer of benchmarks/peers.py, into DIR (default: .peers
# in the repository root, which git ignores), outside the venv: --no-deps keeps its old pins
# out, einops is its one import the venv lacks, and nnsight (its language-model tracer) is
# imported by modules the benchmark never calls, so a one-line stub stands in for it.
# Usage: benchmarks/peers_setup.sh [DIR] (uses $PYTHON, default: python)
set -eu
dir="${1:-$(dirname "$0")/../.peers}"
"${PYTHON:-python}" -m pip install --no-deps --target "$dir" dictionary-learning==0.1.0 einops
mkdir -p "$dir/nnsight"
echo 'LanguageModel = None  # stub: imported by dictionary_learning, unused' > "$dir/nnsight/__init__.py"
echo "installed into $dir; run: python benchmarks/peers.py --peers $dir"
