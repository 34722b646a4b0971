#!/usr/bin/env bash
# Build the images without network access during the build: a wheelhouse prepared on this host
# (`pip download` of the locks, cached under ~/.cache/lora-sweep-docker) is passed in as images
# made with `docker import`, bind-mounted by the Dockerfiles' RUN steps, and every build runs
# with --network=none. Where no container registry can be reached, the base is the stand-in of
# docker/local-base.sh (Debian 12 from Debian's mirror) and PostgreSQL the stand-in of
# docker/Dockerfile.postgres (Debian's postgresql on that base).
#
#   docker/build.sh [cpu] [gpu] [postgres]       # default: cpu postgres
#
# Environment: BASE_IMAGE (default: python:3.11.17-slim-bookworm where it can be pulled, else
# the stand-in), POSTGRES_IMAGE (default: postgres:16.15-bookworm where it can be pulled, else
# the stand-in), LORA_SWEEP_DOCKER_CACHE (default ~/.cache/lora-sweep-docker), GIT_COMMIT.
# Prints one `built IMAGE in Ns (SIZE)` line per image; the last lines are BASE_IMAGE=... and
# POSTGRES_IMAGE=... for docker/compose.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(cpu postgres)
cache="${LORA_SWEEP_DOCKER_CACHE:-$HOME/.cache/lora-sweep-docker}"
wheelhouse="$cache/wheelhouse"
official_base="python:3.11.17-slim-bookworm"
official_postgres="postgres:16.15-bookworm"
standin_base="lora-sweep-base:bookworm-py3.11"
standin_postgres="lora-sweep-postgres:15-bookworm"

# A client that builds with BuildKit: Docker >= 23 with buildx, or Debian's docker.io 20.10 CLI
# with DOCKER_BUILDKIT=1 (a newer CLI without the buildx plugin cannot).
docker=""
for candidate in "${DOCKER:-docker}" /usr/bin/docker; do
  command -v "$candidate" >/dev/null || continue
  if "$candidate" buildx version >/dev/null 2>&1; then docker="$candidate"; break; fi
  major="$("$candidate" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1 || true)"
  if [ -n "$major" ] && [ "$major" -lt 23 ] 2>/dev/null; then docker="$candidate"; break; fi
done
[ -n "$docker" ] || { echo "build.sh: no docker CLI that builds with BuildKit (install buildx, or Debian's docker.io)" >&2; exit 1; }
export DOCKER_BUILDKIT=1

have() { "$docker" image inspect "$1" >/dev/null 2>&1; }
pullable() { have "$1" || timeout 120 "$docker" pull -q "$1" >/dev/null 2>&1; }
sha() { cat "$@" | sha256sum | cut -c1-12; }
human() { "$docker" image inspect -f '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1 / 1e9}'; }

# ---- room on the engine's disk ----------------------------------------------------------------
# With the vfs storage driver (the one that runs anywhere, CI's) every layer is a full copy of the
# image below it: rebuilding the CPU and GPU images after a code change took 17.5 GiB more at its
# peak (the new layers, and BuildKit's snapshots of them) on top of what the images hold
# (bench/BENCH.md). A build that runs out of room leaves the disk full for everything else on the
# machine, so check first, and drop what earlier builds left: our images no tag names any more (one
# a container used when its tag moved).
vfs=0
[ "$("$docker" info -f '{{.Driver}}' 2>/dev/null)" = vfs ] && vfs=1
for title in "lora-sweep (CPU)" "lora-sweep (GPU)"; do
  "$docker" image prune -f --filter "label=org.opencontainers.image.title=$title" >/dev/null 2>&1 || true
done
need_gb=${LORA_SWEEP_DOCKER_NEED_GB:-$(( vfs ? 25 : 8 ))}
root_dir="$("$docker" info -f '{{.DockerRootDir}}' 2>/dev/null || true)"
free_gb="$(df -P -BG "$root_dir" 2>/dev/null | awk 'NR == 2 {sub("G", "", $4); print $4}' || true)"
if [ -n "$free_gb" ] && [ "$free_gb" -lt "$need_gb" ]; then
  echo "build.sh: $free_gb GiB free on $root_dir (Docker's data), a build here needs about $need_gb GiB" \
       "(the vfs driver copies the whole image for every layer). Free some: docker builder prune -af," \
       "docker image prune, docker container prune; or set LORA_SWEEP_DOCKER_NEED_GB to build anyway." >&2
  exit 1
fi
# A build that fails keeps its steps' snapshots: drop the cache no step of this run touched, as a
# build that succeeds does (below).
prune_stale_cache() {
  if [ "$vfs" = 1 ]; then
    "$docker" builder prune -af --filter "until=$(( $(date +%s) - start ))s" >/dev/null 2>&1 || true
  fi
}
trap 'status=$?; [ $status = 0 ] || prune_stale_cache' EXIT

# ---- the base -------------------------------------------------------------------------------
if [ -z "${BASE_IMAGE:-}" ]; then
  if pullable "$official_base"; then BASE_IMAGE="$official_base"; else
    echo "build.sh: $official_base cannot be pulled here; using the stand-in $standin_base"
    t0=$(date +%s)
    DOCKER="$docker" docker/local-base.sh "$standin_base"
    BASE_IMAGE="$standin_base"
    echo "base: $standin_base ready in $(( $(date +%s) - t0 ))s"
  fi
fi

# ---- the wheelhouse: one folder and one imported image per lock set ------------------------
# pip download runs only when the locks changed (a stamp holds their hash); the image is tagged
# with a hash of the stamp and the wheels' names, so an unchanged wheelhouse is not imported
# again and keeps the build cache (a new import would be a new image, and every layer above new).
# CPython 3.11 on glibc 2.36 (Debian 12, the base), whatever Python runs this script
platforms="$(for n in $(seq 36 -1 17); do printf -- '--platform manylinux_2_%s_x86_64 ' "$n"; done)--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64 --platform any"
wheels() {  # wheels NAME PIP-ARGS... ; prints the image
  local name="$1"; shift
  local key; key="$(printf '%s\n' "$*" | cat - docker/requirements*.lock | sha256sum | cut -c1-12)"
  local dir="$wheelhouse/$name" image
  if [ "$(cat "$dir/.stamp" 2>/dev/null)" != "$key" ]; then
    mkdir -p "$dir"   # kept between runs: pip skips the wheels it already has
    t0=$(date +%s)
    if ! python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary :all: \
      --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none $platforms \
      -d "$dir" "$@" >"$dir.log" 2>&1; then
      grep -v "^WARNING: Location" "$dir.log" | tail -n 20 >&2
      echo "build.sh: pip download for $name failed (full log: $dir.log)" >&2
      exit 1
    fi
    echo "$key" >"$dir/.stamp"
    echo "wheelhouse $name: $(du -sh "$dir" | cut -f1) in $(( $(date +%s) - t0 ))s" >&2
  fi
  # the image's tag: the locks' hash and the wheels' names (a wheelhouse repaired by hand is new)
  image="lora-sweep-wheels-$name:$(cd "$dir" && ls ./*.whl | cat - .stamp | sha256sum | cut -c1-12)"
  if ! have "$image"; then
    tar -C "$dir" --exclude .stamp -c . | "$docker" import --message "wheelhouse $name ($key)" - "$image" >/dev/null
  fi
  echo "$image"
}

# The image a tag named before a build is untagged by it: remove it (with the vfs storage driver
# every layer is a full copy, and rebuilds after code changes filled a 100 GB disk with them); one a
# container still uses stays.
untag_removed() {  # untag_removed TAG OLD-ID
  if [ -n "$2" ] && [ "$2" != "$("$docker" image inspect -f '{{.Id}}' "$1")" ]; then
    "$docker" image rm "$2" >/dev/null 2>&1 || true
  fi
}

build() {  # build TAG DOCKERFILE TORCH-WHEELS-IMAGE
  local tag="$1" file="$2" torch="$3" t0 old; t0=$(date +%s)
  old=$("$docker" image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
  "$docker" build --network=none -f "$file" -t "$tag" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg WHEELS_IMAGE="$common" \
    --build-arg TORCH_WHEELS_IMAGE="$torch" --build-arg PIP_NO_INDEX=1 \
    --build-arg GIT_COMMIT="${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}" . >&2
  untag_removed "$tag" "$old"
  echo "built $tag in $(( $(date +%s) - t0 ))s ($(human "$tag"))"
}

for target in "${targets[@]}"; do
  case "$target" in
    cpu)
      common="$(wheels common -r docker/requirements.lock -r docker/requirements-dashboard.lock)"
      # torch's CPU build: from PyTorch's CPU index (or a local wheel that pip's configuration finds)
      torch="$(wheels cpu --extra-index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu)"
      build lora-sweep:cpu docker/Dockerfile.cpu "$torch" ;;
    gpu)
      common="$(wheels common -r docker/requirements.lock -r docker/requirements-dashboard.lock)"
      # PyPI only: a local torch 2.13.0+cpu wheel would satisfy torch==2.13.0 too (--isolated)
      torch="$(wheels gpu --isolated --index-url https://pypi.org/simple -r docker/requirements-gpu.lock)"
      build lora-sweep:gpu docker/Dockerfile "$torch" ;;
    postgres)
      if [ -z "${POSTGRES_IMAGE:-}" ]; then
        if [ "$BASE_IMAGE" != "$standin_base" ] && pullable "$official_postgres"; then POSTGRES_IMAGE="$official_postgres"; else
          POSTGRES_IMAGE="$standin_postgres"
          t0=$(date +%s)
          # Debian's postgresql comes from Debian's mirror: this build needs the network
          old=$("$docker" image inspect -f '{{.Id}}' "$standin_postgres" 2>/dev/null || true)
          tar -C docker -c Dockerfile.postgres postgres-entrypoint.sh \
            | "$docker" build -f Dockerfile.postgres -t "$standin_postgres" --build-arg BASE_IMAGE="$BASE_IMAGE" - >&2
          untag_removed "$standin_postgres" "$old"
          echo "built $standin_postgres in $(( $(date +%s) - t0 ))s ($(human "$standin_postgres"))"
        fi
      fi ;;
    *) echo "build.sh: unknown target $target (cpu, gpu, postgres)" >&2; exit 2 ;;
  esac
done
# BuildKit keeps a snapshot of every step it ran, and with vfs each is a full copy of the image up
# to that step: the cache of the builds before a code change (two 6 GB copies for the GPU image)
# is what filled the disk, not the images. Keep what this run built or reused (the next build of
# the same locks starts from it) and drop the cache no step of this run touched.
prune_stale_cache
echo "BASE_IMAGE=$BASE_IMAGE"
[ -z "${POSTGRES_IMAGE:-}" ] || echo "POSTGRES_IMAGE=$POSTGRES_IMAGE"
