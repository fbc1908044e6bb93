# syntax=docker/dockerfile:1
# One image for all ballast binaries: ballast-operator, ballast-proxy and
# ballast-drain. The operator runs its proxies (and the drain helper in app
# pods) from this same image, so every part of one release speaks the same
# protocol version.
#
# `--target demo-app` builds the sample app and load generator instead
# (ghcr.io/ballast-dev/demo-app: config/samples, Tilt and the real-cluster e2e).

FROM rust:1-alpine AS build
# The musl target links fully static binaries; TLS is rustls + ring (no OpenSSL),
# which needs only a C toolchain and the musl headers.
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
# The registry, git checkouts and target dir live in BuildKit cache mounts, so a
# rebuild recompiles only what changed. The target dir is not in the image, so
# the binaries are copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p ballast-operator -p ballast-proxy -p ballast-integration \
 && mkdir -p /out /demo \
 && cp target/release/ballast-operator target/release/ballast-proxy target/release/ballast-drain /out/ \
 && cp target/release/ballast-sample-app target/release/ballast-load /demo/

FROM gcr.io/distroless/static-debian12:nonroot AS demo-app
COPY --from=build /demo/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/ballast-sample-app"]

# The default target (last stage): the ballast image.
FROM gcr.io/distroless/static-debian12:nonroot AS ballast
COPY --from=build /out/ /usr/local/bin/
# 65532 is distroless' `nonroot`; numeric so runAsNonRoot can verify it.
USER 65532:65532
# Pods choose the binary with `command`; without one the image runs the operator.
ENTRYPOINT ["/usr/local/bin/ballast-operator"]
CMD ["run"]
