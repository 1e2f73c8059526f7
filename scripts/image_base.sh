#!/usr/bin/env bash
# Makes a stand-in for the Dockerfile's base image, python:3.11.13-slim-bookworm, from Debian
# packages, on a machine that can reach Debian's mirror and PyPI but no container registry (CI).
#
#   scripts/image_base.sh            # does nothing when the tag exists already
#   scripts/image_base.sh --force    # makes it again
#
# What it is (docs/cluster.md, "The image"): Debian 12 (mmdebstrap) with Debian's python3 (3.11.2,
# not 3.11.13) and a venv at /usr/local, so `python` and `pip` are in /usr/local/bin and pip
# installs without PEP 668's block, as in the real image. Two additions for this kind of machine:
#   - the host's local CA certificates (/usr/local/share/ca-certificates, the folder
#     update-ca-certificates reads) are installed in the image the same way, because the machine
#     reaches the registries through a TLS proxy that only the host trusts. A company CA is the same
#     situation. Installed with update-ca-certificates (not written over the bundle), they survive
#     the Dockerfile reinstalling ca-certificates;
#   - /etc/pip.conf names that bundle (`cert`, pip ships its own otherwise) and the wheel cache
#     $PIP_FIND_LINKS (`find-links`: the CPU torch wheel lives there). `make image` mounts that folder
#     read-only at the same path during the build, so pip prefers torch 2.13.0+cpu to PyPI's CUDA
#     build.
# Needs root, podman and mmdebstrap; eatmydata makes it faster (.ci/run installs them).
set -euo pipefail

TAG="${BASE_IMAGE:-docker.io/library/python:3.11.13-slim-bookworm}"
WHEELS="${PIP_FIND_LINKS:-/opt/wheels}"
LOCAL_CA=/usr/local/share/ca-certificates
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

if [[ "${1:-}" != "--force" ]] && podman image exists "$TAG"; then
    echo "image_base: $TAG exists"
    exit 0
fi
for tool in podman mmdebstrap; do
    command -v "$tool" >/dev/null || { echo "error: $tool: not installed (apt-get install $tool)" >&2; exit 2; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/ca"
# Only the certificates update-ca-certificates would take (*.crt); none is fine too.
find "$LOCAL_CA" -maxdepth 2 -name '*.crt' -exec cp --parents -t "$work/ca" {} + 2>/dev/null || true
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\nfind-links = %s\n' "$WHEELS" >"$work/pip.conf"

# dpkg's fsyncs are most of the time on a slow disk: eatmydata skips them (3-5x faster here).
FAST=()
if [[ -d /usr/share/mmdebstrap/hooks/eatmydata ]] && command -v eatmydata >/dev/null; then
    FAST=(--hook-dir=/usr/share/mmdebstrap/hooks/eatmydata)
fi
# Like Debian's own slim images: no docs, man pages or translations (also for later apt installs).
mmdebstrap --variant=apt "${FAST[@]}" --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook="mkdir -p \"\$1$LOCAL_CA\" && if [ -d '$work/ca$LOCAL_CA' ]; then cp -r '$work/ca$LOCAL_CA/.' \"\$1$LOCAL_CA/\"; fi" \
    --customize-hook='chroot "$1" update-ca-certificates' \
    --customize-hook='chroot "$1" python3 -m venv /usr/local' \
    --customize-hook="cp '$work/pip.conf' \"\$1/etc/pip.conf\"" \
    bookworm "$work/base.tar" \
    "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" "deb $SECURITY bookworm-security main" \
    </dev/null

podman import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "stand-in for $TAG: Debian bookworm python3 + venv at /usr/local (scripts/image_base.sh)" \
    "$work/base.tar" "$TAG"
echo "image_base: made $TAG"
