# syntax=docker/dockerfile:1
# One image with the three kvferry binaries and the llama.cpp libraries.
# Build: docker build -t kvferry .
# Run one per container: `ctxserver`, `genserver` or `router` (see deploy/);
# --engine=llamacpp --model-path=/models/FILE.gguf serves a GGUF model
# mounted at /models (the libraries are at /opt/kvferry/llama, the default
# of --llama-lib-dir in this image).
# GPU image: docker build --target cuda -t kvferry:cuda . — the same binaries
# with llama.cpp built with CUDA from the same source (scripts/
# deps-llama-cuda.sh); run it with the NVIDIA container runtime. Neither
# target can be built on the project's CI machine (no Docker engine there).

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
ARG COMMIT=unknown
# cgo: go-nvml loads the NVIDIA management library with dlopen at run time
# (absent library = no GPU), so the binaries need libc, not the library.
# llama.cpp is reached through yzma (purego + libffi), no cgo.
ENV CGO_CFLAGS=-Wno-deprecated-declarations
RUN CGO_ENABLED=1 go build -trimpath \
      -ldflags "-s -w -X github.com/kvferry/kvferry/pkg/buildinfo.Version=${VERSION} -X github.com/kvferry/kvferry/pkg/buildinfo.Commit=${COMMIT}" \
      -o /out/ ./cmd/ctxserver ./cmd/genserver ./cmd/router ./cmd/kvload

# The llama.cpp shared libraries: the pinned npm package, integrity checked
# by scripts/deps-llama.sh (the same script make deps-llama runs).
FROM node:20-bookworm-slim AS llama
COPY scripts/deps-llama.sh /deps-llama.sh
RUN /deps-llama.sh /opt/kvferry/llama

# The llama.cpp source of the CPU libraries (node-llama-cpp@3.22.1, integrity
# checked by the script), built with CUDA for Hopper (CUDA_SM=90) by default.
FROM node:20-bookworm-slim AS llama-src
RUN apt-get update && apt-get install -y --no-install-recommends git xz-utils && rm -rf /var/lib/apt/lists/*
COPY scripts/deps-llama-cuda.sh /deps-llama-cuda.sh
RUN /deps-llama-cuda.sh source /llama-src.tar.xz

FROM nvidia/cuda:13.0.1-devel-ubuntu24.04 AS llama-cuda
ARG CUDA_SM=90
RUN apt-get update && apt-get install -y --no-install-recommends cmake ninja-build xz-utils && rm -rf /var/lib/apt/lists/*
COPY scripts/deps-llama-cuda.sh /deps-llama-cuda.sh
COPY --from=llama-src /llama-src.tar.xz /llama-src.tar.xz
COPY --from=llama /opt/kvferry/llama/_nlcBuildMetadata.json /opt/kvferry/llama/
RUN KVFERRY_LLAMA_LIB_DIR=/opt/kvferry/llama /deps-llama-cuda.sh build /llama-src.tar.xz /opt/kvferry/llama-cuda ${CUDA_SM}

FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04 AS cuda
RUN apt-get update && apt-get install -y --no-install-recommends libffi8 libstdc++6 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin nonroot
COPY --from=build /out/ctxserver /out/genserver /out/router /out/kvload /usr/local/bin/
COPY --from=llama-cuda /opt/kvferry/llama-cuda /opt/kvferry/llama
ENV KVFERRY_LLAMA_LIB_DIR=/opt/kvferry/llama LD_LIBRARY_PATH=/opt/kvferry/llama
USER 65532:65532
EXPOSE 8000 8001 8002 9100 9101 9102 9200 9201 9202
ENTRYPOINT []
CMD ["/usr/local/bin/router"]

# The default image (the last stage): CPU llama.cpp libraries.
FROM debian:bookworm-slim AS cpu
# libffi (yzma's calls into llama.cpp) and libstdc++ (llama.cpp itself).
RUN apt-get update && apt-get install -y --no-install-recommends libffi8 libstdc++6 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin nonroot
COPY --from=build /out/ctxserver /out/genserver /out/router /out/kvload /usr/local/bin/
COPY --from=llama /opt/kvferry/llama /opt/kvferry/llama
ENV KVFERRY_LLAMA_LIB_DIR=/opt/kvferry/llama
USER 65532:65532
EXPOSE 8000 8001 8002 9100 9101 9102 9200 9201 9202
ENTRYPOINT []
CMD ["/usr/local/bin/router"]
