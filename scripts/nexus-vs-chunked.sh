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
# more profile flags; PREFILL_SMS: the fixed split's prefill SMs (96). LIGHT=RATE:N takes the
# objective from a run of chunked alone at RATE with N requests (NAME-light.json) instead of the
# lowest rate of the comparison, so that a long trace need not be run at a light rate too.
# CHUNKED_TOKENS="768 1024" then runs chunked again at each of these iteration budgets
# (--max-num-batched-tokens), on the same traces and against the same objective: chunked as a user
# would tune it for TBT (NAME-chunkedT.json; CHUNKED_FLAGS: more flags for those runs).
set -euo pipefail
if [ $# -lt 5 ]; then sed -n 2,17p "$0" >&2; exit 2; fi
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
objective=(--slo-scale 5)
if [ -n "${LIGHT:-}" ]; then
    "$nexus" bench --model "$model" --workload "$workload" --rate "${LIGHT%%:*}" --num-requests "${LIGHT#*:}" \
        --seed 0 --schedule chunked --json "$out/$name-light.json" | tee "$out/$name-light.md"
    # 5x chunked's p95 TTFT and p95 TBT there, as --slo-scale 5 takes them from the lowest rate.
    read -r -a objective < <(python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))["runs"][0]
print("--slo-ttft-ms %.0f --slo-tbt-ms %.1f" % (5e3 * r["ttft_s"]["p95"], 5e3 * r["tbt_s"]["p95"]))' "$out/$name-light.json")
fi
"$nexus" bench --model "$model" --workload "$workload" --rate "$rates" --num-requests "$requests" --seed 0 \
    --schedule chunked,nexus,nexus --prefill-sms "$fixed" --profile "$profile" "${objective[@]}" \
    --json "$out/$name.json" --plot "$out/$name.svg" "$@" | tee "$out/$name.md"
if [ -n "${CHUNKED_TOKENS:-}" ]; then
    # The comparison's objective, for the tuned runs too.
    read -r -a slo < <(python3 -c 'import json, sys
s = json.load(open(sys.argv[1]))["slo"]
print("--slo-ttft-ms %.0f --slo-tbt-ms %.1f" % (1e3 * s["ttft_p95_s"], 1e3 * s["tbt_p95_s"]))' "$out/$name.json")
fi
for tokens in ${CHUNKED_TOKENS:-}; do
    # shellcheck disable=SC2086 # CHUNKED_FLAGS is a list of flags
    "$nexus" bench --model "$model" --workload "$workload" --rate "$rates" --num-requests "$requests" --seed 0 \
        --schedule chunked --max-num-batched-tokens "$tokens" "${slo[@]}" ${CHUNKED_FLAGS:-} \
        --json "$out/$name-chunked$tokens.json" | tee "$out/$name-chunked$tokens.md"
done
tar czf "$out/$name.tgz" -C "$out" $(cd "$out" && ls "$name".* "$name"-* 2>/dev/null | grep -v '\.tgz$')
