# syntax=docker/dockerfile:1
# The operator image (`dynakv-operator`). Build from the repository root:
#   docker build -f deploy/docker/operator.Dockerfile -t dynakv/dynakv-operator:0.1.0 .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p dynakv-operator --bin dynakv-operator \
    && install -D -m 0755 target/release/dynakv-operator /out/dynakv-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/dynakv-operator /usr/local/bin/dynakv-operator
USER 65532:65532
# /metrics, /healthz, /readyz
EXPOSE 8080
ENTRYPOINT ["dynakv-operator"]
CMD ["run"]
