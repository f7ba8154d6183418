#!/usr/bin/env bash
# The GPU check of issue 11 as one prepared call on a lent, offline GPU machine (docs/benchmarks.md, "GPU").
#
#   bash benchmarks/gpu_session.sh prepare   # here, with a package index: the wheels rewardctl needs that
#                                            # the GPU image lacks or holds at other versions, into .whl/
#                                            # (git-ignored), pinned by constraints.txt, for CPython 3.12
#                                            # and ../shared/data's four datasets into .gpu-data/ (git-ignored)
#   bash benchmarks/gpu_session.sh run       # there (.whl and .gpu-data carried): installs the wheels beside
#                                            # the image's torch, then every method in every layout, full
#                                            # fine-tuning; JSON and log into $OUT (else bench-results/)
#   bash benchmarks/gpu_session.sh run-lora  # the same with LoRA and gradient checkpointing (a second call)
#   bash benchmarks/gpu_session.sh profile   # where a step's time goes (benchmarks/gpu_profile.py): pairwise
#                                            # in each layout, torch.profiler over 3 steps after 8
#   bash benchmarks/gpu_session.sh reads     # PRM and BCO computing what their loss reads vs every position
#                                            # (benchmarks/reads_only.py), and BCO's vocabulary projection at
#                                            # the completion positions (benchmarks/policy_logits.py), padded
#                                            # sdpa batches on the Qwen2.5-0.5B shape, 20 steps of 16 x 512
# Arguments after the mode go to the script, e.g. `run --methods bco,prm` or `profile --layouts padded`.
#
# With the device tool: run(command="bash benchmarks/gpu_session.sh run", carry=[".whl", ".gpu-data"],
# timeout_s=580), then at once (the machine stays warm 30 s) the same with run-lora if time is left.
#
# The image's torch (CUDA) is kept; transformers, accelerate, peft, datasets and Hydra are pinned to what
# CI tests, so the numbers are this code's on the versions it is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."

# huggingface_hub (and hf-xet) stay the image's (1.33, which transformers' >=1.31 accepts): the pinned
# 2.x needs httpx2, which the image lacks.
PACKAGES=(transformers tokenizers safetensors accelerate peft datasets dill multiprocess
  xxhash fsspec hydra-core omegaconf antlr4-python3-runtime PyYAML regex packaging filelock tqdm typer)

pinned() {  # name==version from constraints.txt (names compared case- and -/_-insensitively)
  local want
  want=$(echo "$1" | tr 'A-Z_' 'a-z-')
  while IFS= read -r line; do
    local name=${line%%==*}
    if [ "$(echo "$name" | tr 'A-Z_' 'a-z-')" = "$want" ]; then echo "$line"; return; fi
  done < constraints.txt
  echo "no pin for $1 in constraints.txt" >&2
  exit 1
}

case "${1:-}" in
  prepare)
    rm -rf .whl && mkdir -p .whl
    for package in "${PACKAGES[@]}"; do
      pin=$(pinned "$package")
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$pin" 2>/dev/null \
        || python3 -m pip wheel -q --no-deps -w .whl "$pin"  # sdist only (antlr4 4.9.3): a pure-Python wheel
    done
    # rewardctl itself is built there from the tree that travels; its build backend comes from here.
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "setuptools>=69" wheel
    if ls .whl | grep -v -e '-py3-none-any\.whl$' -e 'abi3' -e 'cp312' -e 'py312'; then
      echo "a wheel above would not install on the GPU machine's CPython 3.12" >&2
      exit 1
    fi
    rm -rf .gpu-data && mkdir -p .gpu-data
    for name in hh_rlhf_pairwise rlhf_glm_sentiment_ranklist hh_rlhf_unpaired prm800k_stepwise; do
      if [ -d "../shared/data/$name" ]; then cp -r "../shared/data/$name" .gpu-data/; fi
    done
    du -sh .whl .gpu-data
    ;;
  run | run-lora | profile | reads)
    mode=$1
    shift
    out=${OUT:-bench-results}
    mkdir -p "$out"
    rm -rf /tmp/site  # a warm machine keeps the last call's packages: install exactly what travelled
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      $(ls .whl/*.whl | grep -v -e '/setuptools-' -e '/wheel-')
    python3 -m pip install -q --no-index --find-links .whl --no-deps --no-compile --no-cache-dir --target /tmp/site .
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_session.log"
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
      | tee -a "$out/gpu_session.log"
    args=(--steps 20 --windows 4 --data-root .gpu-data --out "$out")
    case $mode in
      run) python3 benchmarks/gpu_methods.py "${args[@]}" "$@" 2>&1 | tee -a "$out/gpu_session.log" ;;
      run-lora)
        python3 benchmarks/gpu_methods.py "${args[@]}" --peft lora --gradient-checkpointing "$@" 2>&1 \
          | tee -a "$out/gpu_session.log"
        ;;
      profile)
        python3 benchmarks/gpu_profile.py --steps 12 --profile-steps 3 --data-root .gpu-data --out "$out" \
          --layouts shared,padded,padding_free "$@" 2>&1 | tee -a "$out/gpu_session.log"
        ;;
      reads)
        gpu=(--shape qwen2.5-0.5b --hardware gpu --data-root .gpu-data --steps 20 --batch 16 --max-length 512 --out "$out")
        for method in prm bco; do
          python3 benchmarks/reads_only.py --method "$method" "${gpu[@]}" "$@" 2>&1 | tee -a "$out/gpu_session.log"
        done
        python3 benchmarks/policy_logits.py --hardware gpu --data-root .gpu-data --steps 20 --batch 16 \
          --max-length 512 --out "$out" "$@" 2>&1 | tee -a "$out/gpu_session.log"
        ;;
    esac
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh prepare|run|run-lora|profile|reads [script arguments]" >&2
    exit 2
    ;;
esac
