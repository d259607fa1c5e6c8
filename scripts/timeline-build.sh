#!/usr/bin/env bash
# Builds the model_step bench with kernels that record a step timeline (`-DNEXUS_TIMELINE`: see
# "Step timeline" in cuda/common.cuh) and copies it to DIR/bench-model_step; ptx/ is put back as
# committed afterwards, so it refuses to run while ptx/ or cuda/ has uncommitted changes.
#
#   scripts/timeline-build.sh DIR
#   # on the GPU machine:
#   NEXUS_TIMELINE=steps.csv NEXUS_MODEL_STEP=llama-3.1-8b DIR/bench-model_step
#   # here:
#   python3 scripts/timeline.py steps.csv
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:?usage: scripts/timeline-build.sh DIR}
cd "$root"
if ! git diff --quiet -- ptx cuda; then
    echo "timeline-build: ptx/ or cuda/ has uncommitted changes; commit them first" >&2
    exit 1
fi
trap 'git checkout -- ptx' EXIT
NEXUS_PTX_DEFINES=-DNEXUS_TIMELINE scripts/build-ptx.sh >/dev/null
json=$(mktemp)
cargo bench --bench model_step --no-run --message-format=json-render-diagnostics >"$json"
bench=$(python3 -c 'import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "model_step":
        print(m["executable"])' "$json" | tail -n 1)
rm -f "$json"
mkdir -p "$out"
cp "$bench" "$out/bench-model_step"
strip "$out/bench-model_step" 2>/dev/null || true
echo "timeline-build: $out/bench-model_step"
