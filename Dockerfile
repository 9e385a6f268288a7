# proxy-broker container image. Two stages: build the release binary with the locked dependencies,
# then copy it alone into a minimal non-root runtime (glibc + libgcc, no shell, no package manager).
# Matches the Helm chart's defaults: user 65532, gRPC on 50051, metrics on 9090, configuration at
# /etc/proxy-broker/broker.yaml (the chart mounts its own over the example baked in here).
#
#   docker build -t proxy-broker:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9090:9090 proxy-broker:0.1.0
#   docker run --rm proxy-broker:0.1.0 --check-config

FROM rust:1.95-bookworm AS build
WORKDIR /src
# .dockerignore keeps target/, .git/ and the chart out of the context. The .proto files are compiled
# by protox (pure Rust): no protoc needed.
COPY . .
RUN cargo build --release --locked --bin proxy-broker \
    && install -D -m 0755 target/release/proxy-broker /out/proxy-broker

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/proxy-broker /usr/local/bin/proxy-broker
# The offline example, so that `docker run` works without a mounted configuration.
COPY examples/broker.yaml /etc/proxy-broker/broker.yaml
# Also used when the arguments are replaced, e.g. `docker run IMAGE --check-config`.
ENV PROXY_BROKER_CONFIG=/etc/proxy-broker/broker.yaml
USER 65532:65532
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/proxy-broker"]
CMD ["--config", "/etc/proxy-broker/broker.yaml"]
