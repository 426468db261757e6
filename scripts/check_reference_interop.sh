#!/usr/bin/env bash
# Checks that checkpoints move both ways between this project and the reference implementation's
# transformers 4.29.2: policy.pt, the Hugging Face files and the tokenizer, for a tiny model of each
# architecture in config/model/ (GPT-NeoX/Pythia, GPT-2, GPT-J, Llama). Not part of the test suite.
#
# It builds (or reuses) a virtual environment with torch (the version installed here, else 2.13.0;
# installed first, so that transformers does not pull another) and transformers==4.29.2, then runs
# scripts/reference_interop.py alternately here and there. One line per check, then `N passed, M failed`;
# the exit status is 1 if any check failed.
#
# Environment:
#   INTEROP_VENV            the 4.29.2 environment; reused if it is complete (default: a temporary one,
#                           deleted afterwards; set this to keep it between runs)
#   PYTHON                  this project's python (default: python)
#   TORCH_VERSION           torch version for the 4.29.2 environment (default: this environment's)
#   INTEROP_GPT2_TOKENIZER  a GPT-2 tokenizer directory or hub name: adds a case with the real BPE tokenizer
#   PIP_INDEX_URL etc.      read by pip as usual (e.g. the CPU-only torch index)
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
TORCH_VERSION=${TORCH_VERSION:-$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null \
    || echo 2.13.0)}
SCRATCH=$(mktemp -d)
VENV=${INTEROP_VENV:-$SCRATCH/venv}
WORK=$SCRATCH/work
mkdir -p "$WORK"
trap 'rm -rf "$SCRATCH"' EXIT
# quiet libraries: the results are the PASS/FAIL lines; the libraries' warnings go to a log
export TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore

venv_is_ready() {
    "$VENV/bin/python" -c 'import safetensors, torch, transformers
assert transformers.__version__ == "4.29.2", transformers.__version__' 2>/dev/null
}

if venv_is_ready; then
    echo "using the transformers 4.29.2 environment in $VENV"
else
    echo "building a transformers 4.29.2 environment in $VENV (torch $TORCH_VERSION)"
    # safetensors: 4.29.2 does not require it, but reads the model.safetensors that transformers 5 writes only with it
    { "$PYTHON" -m venv "$VENV" \
        && "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" \
        && "$VENV/bin/pip" install -q "transformers==4.29.2" safetensors; } >"$SCRATCH/install.log" 2>&1
    if ! venv_is_ready; then
        tail -n 20 "$SCRATCH/install.log"
        echo "0 passed, 1 failed (could not build the transformers 4.29.2 environment in $VENV)"
        exit 1
    fi
fi

RESULTS=$SCRATCH/results.txt
: >"$RESULTS"
step() {  # step NAME PYTHON ARGS...: run one driver step; a crash with no FAIL line counts as one
    local name=$1 python=$2
    shift 2
    local failed_before
    failed_before=$(grep -c '^FAIL' "$RESULTS")
    "$python" scripts/reference_interop.py "$name" "$WORK" "$@" 2>>"$SCRATCH/$name.log" | tee -a "$RESULTS"
    local status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then
        if [ "$(grep -c '^FAIL' "$RESULTS")" -eq "$failed_before" ]; then
            echo "FAIL  $name crashed (exit $status)" | tee -a "$RESULTS"
        fi
        echo "      the end of $name's log:"
        tail -n 15 "$SCRATCH/$name.log" | sed 's/^/      /'
    fi
}

echo "here: $("$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
echo "there: $("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
step write-here "$PYTHON" ${INTEROP_GPT2_TOKENIZER:+--gpt2-tokenizer "$INTEROP_GPT2_TOKENIZER"}
step check-there "$VENV/bin/python"
step check-here "$PYTHON"

passed=$(grep -c '^PASS' "$RESULTS")
failed=$(grep -c '^FAIL' "$RESULTS")
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
