#!/usr/bin/env bash
# On a CUDA host, from the repository root: build and install lcsc_fast with its CUDA kernels,
# run the CUDA tests, then the GPU benchmarks, writing logs and JSON under OUTDIR.
#
#   bash benchmarks/run_cuda.sh OUTDIR [steps...]
#
# steps: any of install, tests, merge, lora (default: all four, in that order). Every step runs
# even when an earlier one fails; the exit status is the number of failed steps. Set
# PIP_INSTALL_FLAGS (e.g. "--no-build-isolation --no-deps" on a host without a package index),
# CUDA_ARCHS (default: CMakeLists.txt's list), and MERGE_ARGS / LORA_ARGS (more options for the
# two benchmarks) as needed.
set -u
out=${1:?usage: bash benchmarks/run_cuda.sh OUTDIR [install tests merge lora]}
shift
steps=${*:-install tests merge lora}
repo=$(pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0

step() {  # step NAME COMMAND...: runs COMMAND, tees its output to OUTDIR/NAME.log
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  (set -o pipefail; "$@" 2>&1 | tee "$out/$name.log")
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ $rc -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
for s in $steps; do
  case $s in
    install)
      archs=()
      [ -n "${CUDA_ARCHS:-}" ] && archs=("-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS")
      # shellcheck disable=SC2086
      step install python3 -m pip install ${PIP_INSTALL_FLAGS:-} "${archs[@]}" .
      step build_info bash -c "cd /tmp && python3 -c 'import json, lcsc_fast; print(lcsc_fast.__file__); \
print(json.dumps(lcsc_fast.build_info()))'"
      ;;
    tests)  # from outside the checkout, so that the installed package is the one imported
      step tests bash -c "cd /tmp && python3 -m pytest -q -m cuda -p no:cacheprovider --durations=8 \
'$repo/tests'"
      ;;
    merge)
      # shellcheck disable=SC2086
      step merge python3 benchmarks/merge_throughput.py --device cuda ${MERGE_ARGS:-} \
        --json "$out/merge-cuda.json"
      ;;
    lora)
      # shellcheck disable=SC2086
      step lora python3 benchmarks/lora_throughput.py --device cuda ${LORA_ARGS:-} \
        --json "$out/lora-cuda.json"
      ;;
    *) echo "unknown step: $s"; failed=$((failed + 1)) ;;
  esac
done
exit $failed
