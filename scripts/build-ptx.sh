#!/usr/bin/env bash
# Compiles cuda/*.cu into ptx/sm_90a/*.ptx (Hopper: compute_90a) and ptx/sm_80/*.ptx (any GPU from
# Ampere on: compute_80), and assembles each sm_90a PTX into ptx/sm_90a/*.cubin with ptxas: nexus-kernels
# embeds all of them and loads the cubins on Hopper, so the driver does not spend seconds
# compiling the PTX at a machine's first start. Also prints ptxas's register / shared memory / spill
# report for sm_90a and fails if an attention, GEMM or streaming-read kernel spills, or if a wgmma
# GEMM's static shared memory outgrows the allowance its ring leaves it.
#
#   scripts/build-ptx.sh           regenerate ptx/
#   scripts/build-ptx.sh --check   regenerate into a temporary folder; fail if ptx/ differs
#   NEXUS_PTX_DEFINES=-DX scripts/build-ptx.sh   with extra nvcc flags (scripts/timeline-build.sh)
#
# nvcc must be 13.0 (the driver on the GPU machine JITs PTX ISA up to 9.0): the one on PATH if it
# is 13.0, else the pinned wheels of ../shared/GPU.md installed into ~/.cache/nexus-cuda.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
check=false
[ "${1:-}" = "--check" ] && check=true

find_nvcc() {
    if command -v nvcc >/dev/null && nvcc --version | grep -q "release 13.0"; then
        command -v nvcc
        return
    fi
    local venv="${NEXUS_CUDA_VENV:-$HOME/.cache/nexus-cuda}"
    local cu
    cu=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -n 1 || true)
    if [ -z "$cu" ] || [ ! -x "$cu/bin/nvcc" ]; then
        echo "build-ptx: installing nvcc 13.0 into $venv" >&2
        python3 -m venv "$venv" >&2
        "$venv/bin/pip" install --quiet --disable-pip-version-check nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 \
            nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
        cu=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13 | head -n 1)
    fi
    echo "$cu/bin/nvcc"
}

nvcc=$(find_nvcc)
ptxas=$(dirname "$nvcc")/ptxas
include=$(dirname "$(dirname "$nvcc")")/include
out="$root/ptx"
if $check; then
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out/sm_90a" "$out/sm_80"
report=$(mktemp)

# nvcc names internal symbols (anonymous namespaces) after a hash of the source's absolute path,
# so compile a copy at a fixed path: the PTX is then the same from every checkout.
src_root=/tmp/nexus-build-ptx-src
# Two builds at once (two checkouts, two shells) would share that copy: take turns.
exec 9>/tmp/nexus-build-ptx.lock
flock 9
rm -rf "$src_root"
mkdir -p "$src_root"
cp -r "$root/cuda" "$src_root/cuda"
flags=(-std=c++17 -O3 -I"$include" -I"$src_root/cuda" -lineinfo ${NEXUS_PTX_DEFINES:-})

# The wgmma GEMMs size their ring to what a CTA may have less an allowance for their static
# arrays (`STATIC_BYTES = SWAP ? swapped : plain` in cuda/gemm.cu, mirrored by the launcher):
# fails if ptxas gives a kernel more static shared memory than its allowance.
static_smem_fits() {
    local report=$1 source=$2 allowance
    allowance=$(grep -oE "STATIC_BYTES = SWAP \? [0-9]+ : [0-9]+" "$source" | grep -oE "[0-9]+" | tr '\n' ' ')
    if [ -z "$allowance" ]; then
        echo "build-ptx: no STATIC_BYTES = SWAP ? N : M in $source" >&2
        return 1
    fi
    awk -v swapped="${allowance%% *}" -v plain="$(echo "$allowance" | cut -d' ' -f2)" '
        /Compiling entry function/ { name = $0; sub(/.*function .\047?/, "", name); sub(/\047.*/, "", name) }
        /bytes smem/ && name ~ /^gemm_wgmma_/ {
            for (i = 1; i < NF; i++) if ($(i + 1) == "bytes" && $(i + 2) == "smem") used = $i
            limit = name ~ /^gemm_wgmma_swap_/ ? swapped : plain
            if (used + 0 > limit + 0) { printf "build-ptx: %s has %d bytes of static shared memory, over its %d\n", name, used, limit > "/dev/stderr"; bad = 1 }
        }
        END { exit bad }' "$report"
}

status=0
for src in "$src_root"/cuda/*.cu; do
    name=$(basename "$src" .cu)
    "$nvcc" "${flags[@]}" -ptx -gencode=arch=compute_90a,code=compute_90a -o "$out/sm_90a/$name.ptx" "$src"
    "$nvcc" "${flags[@]}" -ptx -gencode=arch=compute_80,code=compute_80 -o "$out/sm_80/$name.ptx" "$src"
    # Drop the line-info file table's absolute paths so the output is the same on every machine.
    sed -i -e "s|$src_root/||g" -e "s|$include/|cuda-include/|g" "$out/sm_90a/$name.ptx" "$out/sm_80/$name.ptx"
    # No debug sections (ptxas would otherwise copy the PTX's line table and text into the cubin, 3x
    # its size; the driver's JIT of the PTX makes none either).
    "$ptxas" -arch=sm_90a -v -lineinfo --suppress-debug-info -o "$out/sm_90a/$name.cubin" "$out/sm_90a/$name.ptx" 2>"$report"
    echo "== $name (sm_90a)"
    grep -E "Compiling entry|registers|spill" "$report" | sed 's/^ptxas info    : //'
    case "$name" in
        *attention*|gemm*|stream_read)
            if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$report" >/dev/null; then
                echo "build-ptx: $name spills registers (see above)" >&2
                status=1
            fi
            ;;
    esac
    if [ "$name" = gemm ] && ! static_smem_fits "$report" "$src_root/cuda/gemm.cu"; then
        status=1
    fi
done
rm -f "$report"
rm -rf "$src_root"

if $check; then
    if ! diff -r -q "$root/ptx" "$out" >/dev/null; then
        diff -r -q "$root/ptx" "$out" >&2 || true
        echo "build-ptx: ptx/ is stale: run scripts/build-ptx.sh and commit ptx/" >&2
        exit 1
    fi
    echo "build-ptx: ptx/ is current"
fi
exit $status
