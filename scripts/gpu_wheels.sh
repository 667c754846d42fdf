#!/usr/bin/env bash
# Wheels that `python3 -m benchmarks --gpu-check` needs on a GPU machine without a package
# registry: Hydra and OmegaConf (config composition), datasets and what it imports (the data
# pipeline's cache), bitsandbytes (method=qlora), liger-kernel (train.kernels=liger) and TRL
# (the SFTTrainer contender of `--gpu`). The check installs only those the machine lacks. Python 3.12,
# linux x86_64, no dependencies resolved here: the check installs them with --no-deps so the
# machine's own torch and transformers stay. The folder is carried with the working tree, which
# is limited to 64 MiB in all, so the total is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.gpu_wheels}"
mkdir -p "$DIR"

# Versions pinned in constraints.txt, so the GPU run uses what CI tests.
pin() { grep -i "^$1==" constraints.txt | head -1; }

PKGS=(hydra-core omegaconf antlr4-python3-runtime bitsandbytes liger-kernel trl
      datasets dill multiprocess xxhash fsspec pandas requests urllib3 idna certifi charset-normalizer)
for pkg in "${PKGS[@]}"; do
  spec="$(pin "$pkg")"
  spec="${spec:-$pkg}"
  # antlr4-python3-runtime 4.9.3 ships only an sdist; build a pure-python wheel from it.
  if [[ "$pkg" == antlr4-python3-runtime ]]; then
    pip wheel --no-deps -q -w "$DIR" "$spec"
    continue
  fi
  pip download --no-deps -q --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 \
    --only-binary=:all: -d "$DIR" "$spec"
done

du -b "$DIR"/*.whl | sort -n | awk '{printf "%8.1f MiB  %s\n", $1/2^20, $2}'
du -cb "$DIR"/*.whl | tail -1 | awk '{printf "%8.1f MiB  total (the working tree carries at most 64 MiB)\n", $1/2^20}'
