#!/usr/bin/env bash
# deps-llama: installs the llama.cpp shared libraries the llamacpp engine
# loads (through yzma, no cgo) into DIR (default .llama/lib). They come
# ready built in the npm package @node-llama-cpp/linux-x64 (CPU backends,
# llama.cpp release v0.5.0, the release yzma v1.28.0 is pinned to); the
# tarball's integrity is pinned here and checked before anything is
# extracted. Idempotent: does nothing when DIR already holds this version.
set -euo pipefail
dir="${1:-.llama/lib}"
pkg="@node-llama-cpp/linux-x64@3.22.1"
integrity="sha512-5uCCDNqWCNfaAm8aR/Uzxbo4HBpKgNF91kCHPepKhgMgV2OAmatoefbOlMihsqCiH2Od35E/eUHQCFbfRBJuOg=="
stamp="$dir/.installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pkg $integrity" ]; then
  exit 0
fi
command -v npm >/dev/null || { echo "deps-llama: npm is needed (apt-get install npm)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$pkg" >/dev/null)
tgz=$(ls "$work"/*.tgz)
got=$(node -e 'process.stdout.write("sha512-" + require("crypto").createHash("sha512").update(require("fs").readFileSync(process.argv[1])).digest("base64"))' "$tgz")
if [ "$got" != "$integrity" ]; then
  echo "deps-llama: $pkg has integrity $got, want $integrity: refusing it" >&2
  exit 1
fi
tar -xzf "$tgz" -C "$work"
rm -rf "$dir"
mkdir -p "$dir"
cp "$work"/package/bins/linux-x64/*.so "$work"/package/bins/linux-x64/_nlcBuildMetadata.json "$dir"/
# yzma's loader opens libllama.so and libggml.so by these names.
ln -sf libllama.v0.5.0.so "$dir/libllama.so"
ln -sf libggml.v0.5.0.so "$dir/libggml.so"
echo "$pkg $integrity" > "$stamp"
echo "deps-llama: llama.cpp libraries in $dir"
