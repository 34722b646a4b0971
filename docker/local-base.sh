#!/usr/bin/env bash
# A stand-in base image made from Debian packages, for a host that reaches Debian's package mirror
# but no container registry (so `FROM python:3.11.17-slim-bookworm` cannot be pulled).
#
#   sudo docker/local-base.sh [IMAGE]          # default IMAGE: lora-sweep-base:bookworm-py3.11
#
# debootstrap (minbase) of Debian 12 with python3 (CPython 3.11, bookworm's), python3-venv and
# ca-certificates, updated from bookworm-updates and bookworm-security, apt lists and caches
# removed, then `docker import`ed as one layer. Both images (Dockerfile.cpu and Dockerfile, through
# their BASE_IMAGE build argument) and the PostgreSQL stand-in (Dockerfile.postgres) start from
# it, so head and workers have the same Python to the patch release, and every image shares this
# one base layer. Needs root, debootstrap and a running Docker engine. Does nothing if IMAGE
# exists (REBUILD=1 makes it again).
set -euo pipefail

image="${1:-lora-sweep-base:bookworm-py3.11}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
docker="${DOCKER:-docker}"

if [ -z "${REBUILD:-}" ] && "$docker" image inspect "$image" >/dev/null 2>&1; then
  echo "local-base: $image exists (REBUILD=1 to make it again)"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "local-base: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "local-base: needs root (debootstrap, chroot)" >&2; exit 1; }

root="$(mktemp -d /var/tmp/lora-sweep-base.XXXXXX)"
chmod 755 "$root"   # the image's / (mktemp makes it 0700: no user but root could enter it)
cleanup() {
  umount "$root/proc" 2>/dev/null || true
  rm -rf --one-file-system "$root"
}
trap cleanup EXIT

start=$(date +%s)
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
  bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; exit 1; }
rm -f "$root.log"

cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
EOF
# No recommended packages, no documentation: keeps this layer (copied whole by the vfs storage
# driver for every layer above it) and the PostgreSQL image small.
cat >"$root/etc/apt/apt.conf.d/90lora-sweep" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF
cat >"$root/etc/dpkg/dpkg.cfg.d/90lora-sweep-nodoc" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
EOF
mount -t proc proc "$root/proc"
chroot "$root" /bin/sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get -y -qq upgrade >/dev/null'
umount "$root/proc"
chroot "$root" /bin/sh -c 'apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log /usr/share/doc/*/changelog* /usr/share/man/* /usr/share/locale/* /tmp/*'
: >"$root/etc/resolv.conf"; : >"$root/etc/hostname"

python="$(chroot "$root" python3 -c 'import platform; print(platform.python_version())')"
tar --numeric-owner -C "$root" -c . | "$docker" import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["bash"]' \
  --message "debootstrap bookworm minbase + python3 $python (docker/local-base.sh)" - "$image" >/dev/null
echo "local-base: $image (Debian 12, Python $python) in $(( $(date +%s) - start ))s"
