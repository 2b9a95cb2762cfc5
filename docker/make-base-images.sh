#!/usr/bin/env bash
# Base images made from Debian's own packages, for machines that reach no public image
# registry (the official python/postgres images are the defaults elsewhere):
#   mods-base:bookworm      Debian 12 + python3 3.11 + venv   -> BASE_IMAGE for docker/Dockerfile
#   mods-postgres:bookworm  the same + PostgreSQL 15           -> POSTGRES_IMAGE in docker/.env
# and docker/local/ for docker/Dockerfile: this machine's CA bundle (pip's proxy) and the
# torch wheels pip finds on its disk (--find-links), which no reachable registry serves.
# Needs root (debootstrap), a running Docker engine and Debian's mirror. Idempotent: an
# image that exists is kept (pass --force to remake it).
set -euo pipefail
cd "$(dirname "$0")"
BASE=${MODS_BASE_IMAGE:-mods-base:bookworm}
POSTGRES=${MODS_POSTGRES_IMAGE:-mods-postgres:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
force=0; [ "${1:-}" = "--force" ] && force=1

# docker/local/: what pip in the build stage needs from this machine.
mkdir -p local/wheels
ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
[ -s "$ca" ] && cp "$ca" local/ca.crt
for dir in ${PIP_FIND_LINKS:-}; do
    for wheel in "$dir"/torch-*.whl; do
        [ -e "$wheel" ] && cp -u "$wheel" local/wheels/
    done
done

have() { [ "$force" = 0 ] && docker image inspect "$1" >/dev/null 2>&1; }

if ! have "$BASE"; then
    command -v debootstrap >/dev/null || { echo "make-base-images: debootstrap is missing (apt-get install debootstrap)" >&2; exit 2; }
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    chmod 755 "$root"  # it becomes the image's /: mktemp's 0700 would lock out every other user
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" "$MIRROR" >/dev/null
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
        --change 'CMD ["python3"]' - "$BASE" >/dev/null
    echo "made $BASE"
fi

if ! have "$POSTGRES"; then
    docker build -q --network host --build-arg BASE_IMAGE="$BASE" \
        -f postgres.Dockerfile -t "$POSTGRES" . >/dev/null
    echo "made $POSTGRES"
fi
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "^(${BASE}|${POSTGRES}) " || true
