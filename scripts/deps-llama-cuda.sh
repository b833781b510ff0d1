#!/usr/bin/env bash
# deps-llama-cuda: llama.cpp's shared libraries with the CUDA backend, built
# from the exact source of the CPU libraries deps-llama installs (the npm
# package node-llama-cpp@3.22.1 carries it as llama/gitRelease.bundle; its
# integrity is pinned here and checked before anything is extracted).
#
#   deps-llama-cuda.sh source TAR          the source, as a 4 MB tar.xz (needs npm)
#   deps-llama-cuda.sh build TAR DIR [SM]  the libraries into DIR (needs a CUDA
#                                          toolkit and cmake; SM: CUDA
#                                          architectures, 90 = Hopper)
#
# The two steps can run on different machines: a GPU machine often has no
# network. DIR gets the CPU libraries' build metadata, so a mixed fleet's
# advertisements name the same llama.cpp release. About 250 s on 16 cores.
set -euo pipefail
pkg="node-llama-cpp@3.22.1"
integrity="sha512-bltIipuWmc123H7tMIgDGKSsSrhmhlQYeVUC48XTjVW7XGJJiJJyCdlTMzQ/LiWoPkGDpcL4FviDpgw7qfTiDw=="
# The source tar this script makes from it (reproducible: see source_tar).
src_sha256="eeb80c8f7ea88910af94f95d483b5719609a4a173169c2a7bc3fd6e4c28788dd"
# What the library build needs of the source tree.
parts=(CMakeLists.txt cmake ggml src include common vendor licenses)

source_tar() {
  local out=$1 work
  if [ -f "$out" ]; then check_tar "$out"; return 0; fi
  command -v npm >/dev/null || { echo "deps-llama-cuda: npm is needed (apt-get install npm)" >&2; exit 1; }
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  (cd "$work" && npm pack --silent "$pkg" >/dev/null)
  local tgz got
  tgz=$(ls "$work"/*.tgz)
  got=$(node -e 'process.stdout.write("sha512-" + require("crypto").createHash("sha512").update(require("fs").readFileSync(process.argv[1])).digest("base64"))' "$tgz")
  if [ "$got" != "$integrity" ]; then
    echo "deps-llama-cuda: $pkg has integrity $got, want $integrity: refusing it" >&2
    exit 1
  fi
  tar -xzf "$tgz" -C "$work" package/llama/gitRelease.bundle
  git clone -q "$work/package/llama/gitRelease.bundle" "$work/src" 2>/dev/null
  mkdir -p "$(dirname "$out")"
  # Byte for byte reproducible (sorted, fixed times and owners, one xz
  # thread), so its sha256 can be pinned and checked before every build.
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - -C "$work/src" "${parts[@]}" | xz -T1 -6 >"$out.partial"
  check_tar "$out.partial"
  mv "$out.partial" "$out"
  echo "deps-llama-cuda: llama.cpp source in $out"
}

# check_tar refuses a source tar whose sha256 is not the pinned one: a tar
# left from an earlier run, or carried to a GPU machine, is checked too.
check_tar() {
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  if [ "$got" != "$src_sha256" ]; then
    echo "deps-llama-cuda: $1 has sha256 $got, want $src_sha256: refusing it (delete it to fetch it again)" >&2
    exit 1
  fi
}

build() {
  local tar=$1 dir=$2 sm=${3:-90} work gen=()
  export PATH=$PATH:/usr/local/cuda/bin
  command -v nvcc >/dev/null || { echo "deps-llama-cuda: no CUDA toolkit (nvcc) here: build on a GPU machine" >&2; exit 1; }
  command -v cmake >/dev/null || { echo "deps-llama-cuda: cmake is needed" >&2; exit 1; }
  command -v ninja >/dev/null && gen=(-G Ninja)
  # Without the CPU libraries' metadata the libraries would advertise
  # "llama.cpp unknown", and a mixed fleet would refuse every transfer
  # between them (kv layout mismatch): check before the long build.
  local meta="${KVFERRY_LLAMA_LIB_DIR:-.llama/lib}/_nlcBuildMetadata.json"
  [ -f "$meta" ] || { echo "deps-llama-cuda: no $meta: run make deps-llama first, or set KVFERRY_LLAMA_LIB_DIR to the CPU libraries" >&2; exit 1; }
  check_tar "$tar"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  tar -xJf "$tar" -C "$work"
  cmake -S "$work" -B "$work/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$sm" -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF \
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' >"$work/cmake.log" 2>&1 || { tail -n 30 "$work/cmake.log" >&2; exit 1; }
  cmake --build "$work/build" -j"$(nproc)" --target llama >"$work/build.log" 2>&1 || { tail -n 30 "$work/build.log" >&2; exit 1; }
  rm -rf "$dir"
  mkdir -p "$dir"
  find "$work/build" -name '*.so*' -exec cp -a {} "$dir/" \;
  cp "$meta" "$dir/"
  echo "deps-llama-cuda: llama.cpp CUDA libraries (sm_$sm) in $dir"
}

case "${1:-}" in
  source) source_tar "${2:?TAR}" ;;
  build) build "${2:?TAR}" "${3:?DIR}" "${4:-90}" ;;
  *) echo "usage: $0 source TAR | build TAR DIR [SM]" >&2; exit 2 ;;
esac
