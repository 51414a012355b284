# syntax=docker/dockerfile:1
# meridian: multi-stage build (Rust builder -> Debian slim runtime).
#   docker build -t meridian .
# docker-compose.yml builds it once (image meridian:local) for the receivers
# and the changefeeds.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# Cargo.toml declares a library, the binary and a criterion dev-dependency;
# copy the whole (filtered, see .dockerignore) context and build the binary.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin meridian \
 && cp target/release/meridian /usr/local/bin/meridian

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: HTTPS sinks with real certificates; curl: health checks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin meridian
COPY --from=builder /usr/local/bin/meridian /usr/local/bin/meridian
# The userscripts are also bind-mounted by docker-compose.yml so they can be
# edited without a rebuild; the copy makes the image usable on its own.
COPY userscripts/ /userscripts/
USER meridian
WORKDIR /userscripts
# 30004: changefeed requests (bindAddr); 30005: receiver metrics; 30006: changefeed metrics.
EXPOSE 30004 30005 30006
ENTRYPOINT ["/usr/local/bin/meridian"]
CMD ["--help"]
