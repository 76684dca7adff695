# One image with the services, the Graph API simulator (reach-meta-sim) and reachctl;
# docker-compose.yml picks the command.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libssl-dev pkg-config && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --workspace --bins

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 reach
COPY --from=build /src/target/release/reach-ingress /src/target/release/reach-webhook-relay \
     /src/target/release/reach-dispatcher /src/target/release/reach-meta-sim \
     /src/target/release/reachctl /usr/local/bin/
USER reach
# The services read only environment variables; see the README's configuration table.
CMD ["reach-ingress"]
