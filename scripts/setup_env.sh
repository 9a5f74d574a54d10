#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its test extras. Idempotent.
# TORCH_SPEC pins torch/torchvision (the CPU-tested pair by default); set it empty to let pip choose.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC-"torch==2.14.1 torchvision==0.29.1"}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q --disable-pip-version-check $TORCH_SPEC -e ".[dev]" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import align, pipelines, rewards, torch, diffusers" \
  || { echo "setup failed: the project does not import" >&2; exit 1; }
# The published reward packages tests/test_reward_reference_packages.py compares against, outside the
# environment (.venv/reference) and without their pinned dependencies (they would downgrade it): ImageReward,
# HPSv2, HPSv3 and the two small modules they import (fairscale, clint), plus the transformers release HPSv3
# pins, which the tests put on the path of a subprocess only. About 6 s; done once.
REFERENCE=.venv/reference
if [ ! -f "$REFERENCE/complete" ]; then
  rm -rf "$REFERENCE"
  pip_ref() {
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
      "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  }
  pip_ref --target "$REFERENCE/packages" image-reward==1.5 hpsv2==1.2.0 hpsv3==1.0.0 fairscale==0.4.13 clint==0.5.1
  pip_ref --target "$REFERENCE/transformers-4.45" transformers==4.45.2 tokenizers==0.20.3 huggingface_hub==0.26.5
  # the hpsv2 1.2.0 wheel lacks the CLIP BPE vocabulary its tokenizer reads at import; open_clip ships the same file
  bpe=$(.venv/bin/python -c "import importlib.util as u; print(u.find_spec('open_clip').submodule_search_locations[0])")
  bpe="$bpe/bpe_simple_vocab_16e6.txt.gz"
  if [ -d "$REFERENCE/packages/hpsv2/src/open_clip" ] && [ -d "$REFERENCE/packages/hpsv3" ] \
      && [ -d "$REFERENCE/packages/ImageReward" ] && [ -d "$REFERENCE/transformers-4.45/transformers" ]; then
    cp "$bpe" "$REFERENCE/packages/hpsv2/src/open_clip/" && touch "$REFERENCE/complete"
  else
    echo "could not install the reference reward packages: tests/test_reward_reference_packages.py will fail" >&2
  fi
fi
