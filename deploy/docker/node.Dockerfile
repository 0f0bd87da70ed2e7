# syntax=docker/dockerfile:1
# The DynaKV node image (`dynakv`). Build from the repository root:
#   docker build -f deploy/docker/node.Dockerfile -t dynakv/dynakv:0.1.0 .
# protox compiles the .proto files in Rust: no protoc in the build image.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p dynakv-node --bin dynakv \
    && install -D -m 0755 target/release/dynakv /out/dynakv

# Small final image: glibc and CA certificates only, no shell, non-root (uid 65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/dynakv /usr/local/bin/dynakv
USER 65532:65532
# gRPC (KV, Admin, Replica, Gossip, Health, reflection) and HTTP /metrics.
EXPOSE 7070 9090
VOLUME ["/data"]
ENTRYPOINT ["dynakv"]
CMD ["serve", "--config", "/etc/dynakv/dynakv.yaml"]
