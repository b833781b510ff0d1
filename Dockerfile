# syntax=docker/dockerfile:1
# One image with the three kvferry binaries. Build: docker build -t kvferry .
# Run one per container: `ctxserver`, `genserver` or `router` (see deploy/).

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
ARG COMMIT=unknown
# cgo: go-nvml loads the NVIDIA management library with dlopen at run time
# (absent library = no GPU), so the binaries need libc, not the library.
ENV CGO_CFLAGS=-Wno-deprecated-declarations
RUN CGO_ENABLED=1 go build -trimpath \
      -ldflags "-s -w -X github.com/kvferry/kvferry/pkg/buildinfo.Version=${VERSION} -X github.com/kvferry/kvferry/pkg/buildinfo.Commit=${COMMIT}" \
      -o /out/ ./cmd/ctxserver ./cmd/genserver ./cmd/router

FROM gcr.io/distroless/base-debian12:nonroot
COPY --from=build /out/ctxserver /out/genserver /out/router /usr/local/bin/
# 65532 is distroless's "nonroot" user.
USER 65532:65532
EXPOSE 8000 8001 8002 9100 9101 9102 9200 9201 9202
ENTRYPOINT []
CMD ["/usr/local/bin/router"]
