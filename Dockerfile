# syntax=docker/dockerfile:1
# One image with the three kvferry binaries and the llama.cpp libraries.
# Build: docker build -t kvferry .
# Run one per container: `ctxserver`, `genserver` or `router` (see deploy/);
# --engine=llamacpp --model-path=/models/FILE.gguf serves a GGUF model
# mounted at /models (the libraries are at /opt/kvferry/llama, the default
# of --llama-lib-dir in this image).

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

FROM debian:bookworm-slim
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
