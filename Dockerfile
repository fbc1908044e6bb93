# syntax=docker/dockerfile:1
# One image for all ballast binaries: ballast-operator, ballast-proxy and
# ballast-drain (plus the kubectl plugin, kubectl-ballast, to copy out). The operator runs its proxies (and the drain helper in app
# pods) from this same image, so every part of one release speaks the same
# protocol version.
#
# `--target demo-app` builds the sample app and load generator instead
# (ghcr.io/ballast-dev/demo-app: config/samples, Tilt and the real-cluster e2e).
#
# Two builds, because the binaries have opposite needs:
# * ballast-drain is copied into app pods whose images can be anything (distroless,
#   alpine, scratch): it must be fully static, so it is built for musl.
# * ballast-proxy serves every request from several threads at once; musl's
#   allocator serialises allocation across threads, glibc's keeps per-thread arenas.
#   The proxy (and the operator) are built against glibc and run on distroless/cc,
#   the same libc `bench/proxy.sh` measures.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The registry, git checkouts and target dir live in BuildKit cache mounts, so a
# rebuild recompiles only what changed. The target dir is not in the image, so
# the binaries are copied out in the same step. The musl build below keeps its own
# target dir (cache id), so the two never invalidate each other.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p ballast-operator -p ballast-proxy -p ballast-integration \
 && mkdir -p /out /demo \
 && cp target/release/ballast-operator target/release/ballast-proxy /out/ \
 && cp target/release/ballast-sample-app target/release/ballast-load /demo/

FROM rust:1-alpine AS build-static
# The musl target links fully static binaries; TLS is rustls + ring (no OpenSSL),
# which needs only a C toolchain and the musl headers.
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,id=ballast-target-musl,target=/src/target,sharing=locked \
    cargo build --release --locked -p ballast-proxy --bin ballast-drain -p kubectl-ballast \
 && mkdir -p /out \
 && cp target/release/ballast-drain target/release/kubectl-ballast /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS demo-app
COPY --from=build /demo/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/ballast-sample-app"]

# The default target (last stage): the ballast image.
FROM gcr.io/distroless/cc-debian12:nonroot AS ballast
COPY --from=build /out/ /usr/local/bin/
COPY --from=build-static /out/ballast-drain /usr/local/bin/ballast-drain
# The kubectl plugin, static, for copying out onto a user's PATH (see the README).
COPY --from=build-static /out/kubectl-ballast /usr/local/bin/kubectl-ballast
# 65532 is distroless' `nonroot`; numeric so runAsNonRoot can verify it.
USER 65532:65532
# Pods choose the binary with `command`; without one the image runs the operator.
ENTRYPOINT ["/usr/local/bin/ballast-operator"]
CMD ["run"]
