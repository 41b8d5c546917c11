# syntax=docker/dockerfile:1
# writeboost-csi image: `make image` (needs a Docker engine).
# Build stage: a static binary (CGO_ENABLED=0), so the runtime image needs no Go toolchain or libc match.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY cmd ./cmd
COPY pkg ./pkg
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/writeboost ./cmd/writeboost

# Runtime: what the plugin calls at run time.
FROM debian:bookworm-slim
ARG VERSION=dev
LABEL org.opencontainers.image.title="writeboost-csi" \
      org.opencontainers.image.description="CSI node plugin writeboost.csi.io: HDD volumes with an NVMe write-back cache slice" \
      org.opencontainers.image.source="https://github.com/writeboost-csi/writeboost-csi" \
      org.opencontainers.image.version="${VERSION}"
# e2fsprogs, xfsprogs: mkfs/fsck/resize of filesystem volumes; util-linux: mount, losetup, blkid;
# lvm2: LVM pools; kmod: modprobe nbd; libnbd-bin (nbdfuse) and fuse3: the fallback attach path
# on kernels without the nbd driver.
RUN apt-get update \
 && apt-get install -y --no-install-recommends e2fsprogs xfsprogs util-linux mount lvm2 kmod libnbd-bin fuse3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/writeboost /usr/local/bin/writeboost
ENTRYPOINT ["/usr/local/bin/writeboost"]
