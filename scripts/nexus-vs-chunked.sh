#!/usr/bin/env bash
# One comparison of the controller issue's experiment, as bench-results/nexus-vs-chunked-h200.md
# ran them: chunked, nexus at a fixed split, and nexus with the controller, on one trace per rate,
# judged against 5x chunked's p95s at the lowest rate. Profiles the model first unless PROFILE
# names a profile. Everything it writes goes under OUT_DIR, and into OUT_DIR/NAME.tgz (the GPU
# machine's device tool returns few files a call: fetch the tarball).
#
#   scripts/nexus-vs-chunked.sh NAME MODEL WORKLOAD RATES REQUESTS [PROFILE] [-- more bench flags]
#   e.g. NEXUS=.gpu/bin/nexus OUT_DIR=$OUT scripts/nexus-vs-chunked.sh llama-mixed \
#        synthetic:llama-3.1-8b mixed 2,5,8,11 50 "" -- --decode-target-ms 20
# NEXUS: the binary (default: nexus on PATH); GRID: the profile's SM grid (8); PROFILE_FLAGS:
# more profile flags; PREFILL_SMS: the fixed split's prefill SMs (96).
set -euo pipefail
if [ $# -lt 5 ]; then sed -n 2,14p "$0" >&2; exit 2; fi
name=$1 model=$2 workload=$3 rates=$4 requests=$5 profile=${6:-}
shift $(( $# >= 6 ? 6 : 5 ))
[ "${1:-}" = "--" ] && shift
nexus=${NEXUS:-nexus}
out=${OUT_DIR:-.}
fixed=${PREFILL_SMS:-96}
mkdir -p "$out"
if [ -z "$profile" ]; then
    profile=$out/$name-profile.json
    # shellcheck disable=SC2086 # PROFILE_FLAGS is a list of flags
    "$nexus" profile --model "$model" --grid "${GRID:-8}" ${PROFILE_FLAGS:-} \
        --samples "$out/$name-measurements.json" --out "$profile" | tee "$out/$name-profile.txt"
fi
"$nexus" bench --model "$model" --workload "$workload" --rate "$rates" --num-requests "$requests" --seed 0 \
    --schedule chunked,nexus,nexus --prefill-sms "$fixed" --profile "$profile" --slo-scale 5 \
    --json "$out/$name.json" --plot "$out/$name.svg" "$@" | tee "$out/$name.md"
tar czf "$out/$name.tgz" -C "$out" $(cd "$out" && ls "$name".* "$name"-* 2>/dev/null | grep -v '\.tgz$')
