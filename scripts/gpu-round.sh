#!/usr/bin/env bash
# One round of GPU checks and benchmarks on the GPU machine, from executables staged by
# ../shared/tools/gpu-stage (DIR/bin/test-*, DIR/bin/bench-*): every GPU test, compute-sanitizer
# memcheck and racecheck on the kernel tests, the kernel and model-step benches and torch SDPA,
# each step under its own time limit. Everything it writes goes into one tarball, OUT/round.tgz
# (the device tool returns few files a call), with round.log saying what each step took and
# whether it passed.
#
#   scripts/gpu-round.sh DIR OUT [STEP ...]
#   e.g. on the device: scripts/gpu-round.sh .gpu $OUT tests sanitize benches sdpa
# Steps (default: tests sanitize benches sdpa, in this order):
#   tests     every test-* with --ignored (without models/, the tests that read the SmolLM2 file
#             are skipped; the synthetic and transformers-random model tests still run)
#   sanitize  memcheck and racecheck on the tests matching each filter in $SANITIZE (default:
#             the streaming read at both depths, decode attention on ragged batches, its
#             portable build, RMSNorm at each warp group, RoPE with the KV write in both styles,
#             a few small GEMMs, split-K GEMMs, the prefill attention batch sized for sanitizers)
#   benches   decode_attention, gemm, prefill_attention, elementwise (criterion's own timing
#             skipped: only the summary tables) and model_step for each model in $MODELS
#   sdpa      scripts/bench-torch-sdpa.py (torch on the device)
#   beside    what slows decode beside a prefill: scripts/probe-decode-beside.py (CuPy), then the
#             GEMM bench's decode rows of its beside section, with nvidia-smi's SM clock, power
#             and clock event reasons every 200 ms (beside-clocks.txt)
#   probes    what bounds the decode GEMMs on few SMs: scripts/probe-register-stream.py (CuPy;
#             shared memory against registers as the weight's path) and
#             scripts/probe-stream-depth.py (the streaming read by bytes in flight)
#   gemm-ab   a GEMM change against a base build: the decode table's rows matching $GEMM_ONLY
#             (default gemm-decode/Llama), of this build alone or, where $BASE is a folder with
#             another build's bench-gemm (or bench-gemm.xz), of both in turns (base, this, base,
#             this), each run's tables in gemm-ab-<n>-<base|new>/; with the GEMM's tests and
#             sanitizers first: TESTS=gemm:: SANITIZE=gemm::few_shapes_for_sanitizers ... tests
#             sanitize gemm-ab
# Tarballs DIR/*.txz (scripts/gpu-pack.sh's, carried in DIR) are unpacked into DIR/bin first.
# LIMIT_S: seconds each step may take (default 240). TESTS: test filters each run as a step of
# its own (so a hang in one module leaves the others' results), default: each binary whole.
set -uo pipefail
if [ $# -lt 2 ]; then sed -n 2,32p "$0" >&2; exit 2; fi
dir=$1 out=$2
shift 2
for packed in "$dir"/*.txz; do
    [ -e "$packed" ] || continue
    mkdir -p "$dir/bin"
    tar xJf "$packed" -C "$dir/bin" || exit 1
done
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests sanitize benches sdpa)
limit=${LIMIT_S:-240}
sanitize=${SANITIZE:-"bandwidth::stream_read_checksums_match_reference decode_attention::gqa_ragged decode_attention::portable elementwise::rms_norm_warp_groups elementwise::rope_and_write_kv_matches_reference_in_both gemm::few_shapes_for_sanitizers gemm::gemm_fusions_for_sanitizers gemm::split_k prefill_attention::small_batches"}
models=${MODELS:-"llama-3.1-8b qwen2.5-3b qwen2.5-14b"}
work=$(mktemp -d)
log=$work/round.log
mkdir -p "$out"
export NEXUS_BENCH_OUT=$work

# Runs "$@" under the step limit, its output in $work/NAME.txt, and logs its time and status.
step() {
    local name=$1
    shift
    local start=$SECONDS
    timeout "$limit" "$@" >"$work/$name.txt" 2>&1
    local rc=$?
    echo "$name: rc $rc in $((SECONDS - start)) s" | tee -a "$log"
    # Rewritten after every step: a round killed from outside still returns what it finished.
    tar czf "$out/round.tgz" -C "$work" .
    return 0
}

for s in "${steps[@]}"; do
    case $s in
    tests)
        skip=()
        [ -d models ] || skip=(--skip model::smollm2 --skip model::gpu_engine_completes
            --skip model::decode_graphs_replay)
        for t in "$dir"/bin/test-*; do
            if [ -z "${TESTS:-}" ]; then
                step "$(basename "$t")" "$t" --ignored --test-threads=1 "${skip[@]}"
                continue
            fi
            for filter in $TESTS; do
                step "$(basename "$t")-${filter//:/_}" "$t" --ignored --test-threads=1 "${skip[@]}" "$filter"
            done
        done
        ;;
    sanitize)
        for t in "$dir"/bin/test-*; do
            for filter in $sanitize; do
                for tool in memcheck racecheck; do
                    step "$tool-${filter//:/_}" compute-sanitizer --tool "$tool" --error-exitcode 1 "$t" \
                        --ignored --test-threads=1 "$filter"
                done
            done
        done
        ;;
    benches)
        # A criterion filter that matches nothing: only the summary tables are timed.
        for b in decode_attention gemm prefill_attention elementwise; do
            [ -x "$dir/bin/bench-$b" ] && step "bench-$b" "$dir/bin/bench-$b" --bench no-criterion-case
        done
        if [ -x "$dir/bin/bench-model_step" ]; then
            for m in $models; do
                step "model_step-$m" env NEXUS_MODEL_STEP="$m" "$dir/bin/bench-model_step"
            done
        fi
        ;;
    sdpa)
        step torch-sdpa python3 scripts/bench-torch-sdpa.py "$work/torch-sdpa.md"
        ;;
    beside)
        nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active --format=csv \
            -lms 200 >"$work/beside-clocks.txt" 2>&1 &
        smi=$!
        step probe-decode-beside env PYTHONUNBUFFERED=1 python3 scripts/probe-decode-beside.py
        [ -x "$dir/bin/bench-gemm" ] &&
            step gemm-beside-decode env NEXUS_BENCH_ONLY="gemm-beside/m 16/" "$dir/bin/bench-gemm" --bench no-criterion-case
        kill "$smi"
        ;;
    probes)
        step probe-register-stream env PYTHONUNBUFFERED=1 python3 scripts/probe-register-stream.py
        step probe-stream-depth env PYTHONUNBUFFERED=1 python3 scripts/probe-stream-depth.py
        ;;
    gemm-ab)
        runs=(new)
        if [ -n "${BASE:-}" ]; then
            [ -e "$BASE/bench-gemm.xz" ] && xz -dkf "$BASE/bench-gemm.xz"
            chmod +x "$BASE/bench-gemm"
            runs=(base new base new)
        fi
        for i in "${!runs[@]}"; do
            run=gemm-ab-$((i + 1))-${runs[$i]}
            bench=$dir/bin/bench-gemm
            [ "${runs[$i]}" = base ] && bench=$BASE/bench-gemm
            mkdir -p "$work/$run"
            step "$run" env NEXUS_BENCH_OUT="$work/$run" NEXUS_BENCH_ONLY="${GEMM_ONLY:-gemm-decode/Llama}" \
                "$bench" --bench no-criterion-case
        done
        ;;
    *)
        echo "gpu-round: unknown step $s" | tee -a "$log"
        ;;
    esac
done

tar czf "$out/round.tgz" -C "$work" .
rm -rf "$work"
echo "gpu-round: $out/round.tgz"
