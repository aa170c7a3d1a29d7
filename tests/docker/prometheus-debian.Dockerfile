# The tests' Prometheus: Debian's `prometheus` package on the project's base image, because Docker
# Hub's prom/prometheus cannot be pulled here. Users get the official image (docker-compose.yml).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
