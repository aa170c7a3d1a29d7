#!/bin/sh
# Builds a local stand-in for python:3.11-slim where Docker Hub cannot be reached (only Debian's
# package mirror): a minimal Debian bookworm with its Python 3.11, a venv at /usr/local so that
# `python` and `pip` are on PATH as in the official image, and this host's CA bundle, so pip in a
# build trusts the same registries the host does. It is named for what it is, never python:*.
#
#   docker/base-image.sh [TAG]      default TAG: fashionbert/python-base:3.11-bookworm
#   docker build --build-arg BASE_IMAGE=fashionbert/python-base:3.11-bookworm ...
#
# Needs root, debootstrap (installed from Debian's mirror if missing) and a running Docker engine.
set -eu
TAG="${1:-fashionbert/python-base:3.11-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "base image $TAG is already there"
  exit 0
fi
command -v debootstrap >/dev/null 2>&1 || {
  apt-get install -y -q --no-install-recommends debootstrap >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends debootstrap >/dev/null; }
}

ROOT="$(mktemp -d /var/tmp/fashionbert-rootfs.XXXXXX)"
trap 'rm -rf "$ROOT"' EXIT
echo "building $TAG: debootstrap bookworm from $MIRROR (about 2 minutes)"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 || { tail -20 "$ROOT.log"; rm -f "$ROOT.log"; exit 1; }
rm -f "$ROOT.log"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
fi
chroot "$ROOT" python3 -m venv /usr/local
chroot "$ROOT" sh -c 'apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc /usr/share/man'
tar -C "$ROOT" -c . | docker import \
  --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' \
  - "$TAG" >/dev/null
echo "base image $TAG built ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%d MB", $1/1e6}'))"
