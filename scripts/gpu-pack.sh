#!/usr/bin/env bash
# Packs the executables that ../shared/tools/gpu-stage staged (DIR/bin, 200 MB and more: over the
# 64 MiB the device tool carries) into xz tarballs a call can carry (xz shrinks them 4-6x; the
# embedded PTX is text): OUT/gpu.txz (the GPU test binary, test-nexus-gpu, 3 MB), OUT/benches.txz
# (every bench-*, 10 MB) and OUT/nexus.txz (the CLI, 5 MB); with the 42 MB tree, all three fit one
# call. Carry OUT, and `scripts/gpu-round.sh OUT $OUT STEPS` unpacks them into OUT/bin first.
# Takes about a minute on two cores.
#
#   ../shared/tools/gpu-stage && scripts/gpu-pack.sh            # .gpu/bin -> .gpx/*.txz
#   scripts/gpu-pack.sh DIR OUT
# Both folders must be ignored by git (.git/info/exclude), or the tree carries them whole.
set -euo pipefail
dir=${1:-.gpu} out=${2:-.gpx}
mkdir -p "$out"
pack() {
    local name=$1
    shift
    (cd "$dir/bin" && tar cJf - "$@") >"$out/$name.txz"
    echo "$out/$name.txz $(du -h "$out/$name.txz" | cut -f1)"
}
mapfile -t benches < <(cd "$dir/bin" && ls bench-*)
pack gpu test-nexus-gpu
pack benches "${benches[@]}"
pack nexus nexus
