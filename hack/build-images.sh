#!/usr/bin/env bash
# The project's container images, built on this machine without any registry, and saved where the local
# node imports them from. Idempotent: an image whose inputs did not change is not rebuilt (its archive is
# named by a hash of its inputs), and the Debian base is made once per set of its inputs.
#
#   hack/build-images.sh [build] [IMAGE...]   build and save IMAGEs (default: all of pause operator serving trainer)
#   hack/build-images.sh import SOCKET [NS]   import the saved images into the containerd listening on SOCKET
#                                             (namespace NS, default k8s.io); one it has with the same digest is skipped
#   hack/build-images.sh list                 print the index of saved images
#
# Saved: $FIELDKUBE_IMAGES_DIR (default ~/.cache/fieldkube/images)/<name>-<inputs hash>.tar, OCI archives
# (zstd layers) named inside by their full reference, and index.json there, a JSON list of
#   {"name", "reference", "archive", "digest", "archive_bytes", "image_size", "inputs", "image_id"}
# (reference: what containerd calls the image; digest: its manifest's digest, as `ctr images ls` shows it).
#
# How: the base is Debian bookworm from mmdebstrap (images/base/packages.txt), committed as
# localhost/fieldkube/debian:bookworm-<hash>; the images are images/*/Dockerfile built by buildah FROM it
# (ARG BASE), with the host's CA bundle mounted for pip (PIP_CERT) and the host's pip cache as their pip
# cache mount, and, for the trainer, the Horovod wheel make dev built (~/.cache/fieldkube/wheels) as the
# horovod-wheel build context (no compiler in the build). buildah keeps its storage
# under $FIELDKUBE_CACHE/buildah and reads images/containers.conf: nothing of the host's /etc/containers
# or /var/lib/containers is used. Needs root (buildah and mmdebstrap run rootful here).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CACHE=${FIELDKUBE_CACHE:-$HOME/.cache/fieldkube}
IMAGES_DIR=${FIELDKUBE_IMAGES_DIR:-$CACHE/images}
INDEX=$IMAGES_DIR/index.json
WORK=$CACHE/buildah
IMAGE_TAG=${IMAGE_TAG:-0.1.0}        # the operator's default trainer image is fieldkube/trainer:0.1.0
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
PIP_CACHE=${PIP_CACHE:-$HOME/.cache/pip}
# Empty: the wheel make dev cached for the pinned torch, else built in the image. A path: that wheel.
# "source": always build Horovod in the image (hack/build-horovod.sh in the horovod-build stage).
HOROVOD_WHEEL=${HOROVOD_WHEEL:-}
DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
IMAGE_PYTHON_TAG=cp311               # bookworm's python3 (and python:3.11-slim-bookworm's) is 3.11
MIN_FREE_GB=10                       # per image built: its new layers and archive (trainer: 3 GB); cold, all: ~13 GB
ALL_IMAGES=(pause operator serving trainer)
START=$(date +%s)

log() { printf '[images %4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
die() { printf '\033[31m[images] error:\033[0m %s\n' "$*" >&2; exit 1; }
sha() { sha256sum | cut -c1-16; }

# --- buildah, with the project's own storage and configuration ---------------------------------------
setup_buildah() {
  [ "$(id -u)" -eq 0 ] || die "needs root (buildah and mmdebstrap run rootful here): sudo $0 $*"
  local tool
  for tool in buildah mmdebstrap gcc python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (make dev installs the Debian packages buildah mmdebstrap gcc)"
  done
  [ -f "$HOST_CA" ] || die "no CA bundle at $HOST_CA (HOST_CA=...): pip in the builds needs it to reach PyPI"
  mkdir -p "$WORK/tmp" "$WORK/logs" "$IMAGES_DIR" "$PIP_CACHE"
  cat > "$WORK/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
EOF
  export CONTAINERS_CONF=$ROOT/images/containers.conf
  export CONTAINERS_STORAGE_CONF=$WORK/storage.conf
  export TMPDIR=$WORK/tmp            # buildah's temporary files (and its type=cache mounts)
  # The Dockerfiles' pip cache (RUN --mount=type=cache,id=fieldkube-pip) is the host's: buildah keeps a
  # type=cache mount of id ID in $TMPDIR/buildah-cache/ID (rootful), here a link to ~/.cache/pip. (A
  # --volume on the same target would race the cache mount: which one wins varies from run to run.)
  mkdir -p "$TMPDIR/buildah-cache"
  if [ "$(readlink "$TMPDIR/buildah-cache/fieldkube-pip" 2>/dev/null)" != "$PIP_CACHE" ]; then
    rm -rf "$TMPDIR/buildah-cache/fieldkube-pip"
    ln -s "$PIP_CACHE" "$TMPDIR/buildah-cache/fieldkube-pip"
  fi
  # One build at a time (make dev and make images may overlap).
  exec 9>"$WORK/lock"
  flock -n 9 || { log "waiting for another hack/build-images.sh to finish"; flock 9; }
  # Working containers left by an interrupted run (only ever ours: this storage is the project's).
  buildah rm --all >/dev/null 2>&1 || true
}

image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# Log each buildah STEP line with the time, the whole output to LOG; on failure its tail and a clear error.
run_logged() {
  local what=$1 logfile=$2 status; shift 2
  set +e
  "$@" 2>&1 | tee "$logfile" | while IFS= read -r line; do
    case "$line" in *STEP\ *) log "  ${line:0:110}" ;; esac
  done
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ]; then
    tail -n 40 "$logfile" >&2
    die "$what failed (exit $status; last lines above, whole log in $logfile)"
  fi
}

# --- the Debian base ----------------------------------------------------------------------------------
BASE_REF=""
BASE_KEY=""
base_args() {
  local packages
  packages=$(grep -v '^\s*#' images/base/packages.txt | tr -s ' \n' ',' | sed 's/^,//; s/,$//')
  [ -n "$packages" ] || die "images/base/packages.txt lists no packages"
  BASE_ARGS=(--variant=minbase "--include=$packages" --aptopt='Acquire::Languages "none"'
    # No documentation, man pages or translations, here and in what the images install later.
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin'
    "$DEBIAN_SUITE")
  BASE_MIRRORS=("deb $DEBIAN_MIRROR $DEBIAN_SUITE main" "deb $DEBIAN_MIRROR $DEBIAN_SUITE-updates main"
    "deb $DEBIAN_SECURITY_MIRROR $DEBIAN_SUITE-security main")
  BASE_KEY=$( { printf '%s\n' "${BASE_ARGS[@]}" "${BASE_MIRRORS[@]}"; mmdebstrap --version; } | sha)
  BASE_REF=localhost/fieldkube/debian:$DEBIAN_SUITE-$BASE_KEY
}

ensure_base() {
  local rootfs=$WORK/base/debian-$DEBIAN_SUITE-$BASE_KEY.tar t0
  if image_exists "$BASE_REF"; then
    log "base: $BASE_REF present"
    return
  fi
  mkdir -p "$WORK/base"
  if [ ! -f "$rootfs" ]; then
    log "base: mmdebstrap $DEBIAN_SUITE (${BASE_ARGS[1]}), ~1 min"
    t0=$(date +%s)
    rm -f "$rootfs.tmp"
    run_logged "mmdebstrap of the base" "$WORK/logs/base.log" \
      mmdebstrap --format=tar "${BASE_ARGS[@]}" "$rootfs.tmp" "${BASE_MIRRORS[@]}"
    find "$WORK/base" -name "debian-$DEBIAN_SUITE-*.tar" ! -name "$(basename "$rootfs")" -delete
    mv "$rootfs.tmp" "$rootfs"
    log "base: root filesystem $(du -h "$rootfs" | cut -f1) in $(( $(date +%s) - t0 ))s"
  fi
  log "base: committing $BASE_REF"
  local ctr
  ctr=$(buildah from scratch)
  buildah add --quiet "$ctr" "$rootfs" / >/dev/null || die "buildah add of $rootfs failed"
  buildah config --env LANG=C.UTF-8 --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd /bin/bash --label org.opencontainers.image.title="fieldkube Debian $DEBIAN_SUITE base" "$ctr"
  buildah commit --quiet --rm "$ctr" "$BASE_REF" >/dev/null || die "buildah commit of $BASE_REF failed"
}

# --- inputs of an image ---------------------------------------------------------------------------------
# The files a Dockerfile copies from the build context (COPY lines without --from), relative to ROOT.
dockerfile_sources() {
  awk '$1 == "COPY" && $0 !~ /--from=/ { for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i }' "$1"
}

# A hash of files and directories, skipping what .dockerignore keeps out of the build context.
hash_paths() {
  find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' \
      ! -path '*/build/*' ! -path '*/dist/*' -print0 \
    | sort -z | xargs -0 sha256sum | sha
}

# The vision-deps stage must read the same in the trainer and serving Dockerfiles for the two images to
# share its layer (buildah reuses a cached layer only for identical instructions on the same parent).
check_shared_stage() {
  local stage
  stage() { awk '/^FROM .* AS vision-deps/ {on=1} on && /^FROM / && !/AS vision-deps/ {exit} on && !/^#/' "$1"; }
  if [ "$(stage images/trainer/Dockerfile)" != "$(stage images/serving/Dockerfile)" ]; then
    log "warning: the vision-deps stages of images/trainer and images/serving differ: the two images will not share their torch layer"
  fi
}

# --- Horovod wheel for the trainer ----------------------------------------------------------------------
HOROVOD_CONTEXT=""
HOROVOD_SHA=""
find_horovod_wheel() {
  local hv tv wheel=""
  if [ "$HOROVOD_WHEEL" = source ]; then
    log "trainer: HOROVOD_WHEEL=source: Horovod is built inside the image (~10 min)"
    return
  fi
  if [ -n "$HOROVOD_WHEEL" ]; then
    [ -f "$HOROVOD_WHEEL" ] || die "HOROVOD_WHEEL=$HOROVOD_WHEEL: no such file"
    wheel=$HOROVOD_WHEEL
  else
    hv=$(sed -n 's/^HOROVOD_VERSION=\${HOROVOD_VERSION:-\(.*\)}$/\1/p' hack/build-horovod.sh)
    tv=$(sed -n 's/^torch==\([^+]*\).*/\1/p' constraints.txt)
    [ -n "$hv" ] && [ -n "$tv" ] || die "cannot read the Horovod version (hack/build-horovod.sh) or torch's pin (constraints.txt)"
    # Only a wheel built without nvcc: the image has no CUDA toolkit to load a CUDA build's ops from.
    wheel=$(ls "$CACHE/wheels/horovod-$hv-torch$tv-nonvcc"/horovod-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$wheel" ]; then
      log "trainer: no Horovod wheel for torch $tv in $CACHE/wheels (make dev builds it): building it inside the image (~10 min)"
      return
    fi
  fi
  case "$(basename "$wheel")" in
    *-"$IMAGE_PYTHON_TAG"-*) ;;
    *) log "trainer: $(basename "$wheel") is not for $IMAGE_PYTHON_TAG (the image's Python): building Horovod inside the image"
       return ;;
  esac
  # The build context holds that one wheel (the Dockerfile installs horovod-*.whl from it).
  HOROVOD_CONTEXT=$WORK/horovod-wheel
  rm -rf "$HOROVOD_CONTEXT" && mkdir -p "$HOROVOD_CONTEXT"
  cp "$wheel" "$HOROVOD_CONTEXT/"
  HOROVOD_SHA=$(sha256sum "$wheel" | cut -d' ' -f1)
  log "trainer: Horovod from $wheel"
}

# --- building and saving one image ----------------------------------------------------------------------
reference_of() {
  case "$1" in
    pause) echo "localhost/fieldkube/pause:$(sed -n 's/^#define PAUSE_VERSION "\(.*\)"/\1/p' images/pause/pause.c)" ;;
    # docker.io/, as containerd expands a pod's `image: fieldkube/trainer:0.1.0`.
    *) echo "docker.io/fieldkube/$1:$IMAGE_TAG" ;;
  esac
}

# The index, a JSON list read and written by python3 (a fresh Debian has no jq):
#   index has NAME ARCHIVE | archive-of NAME IMAGE_ID | put NAME REFERENCE ARCHIVE DIGEST IMAGE_SIZE INPUTS IMAGE_ID
#   | drop-missing | tsv | count
index() {
  python3 - "$INDEX" "$@" <<'PY'
import json, os, sys

path, cmd, *args = sys.argv[1:]
entries = json.load(open(path)) if os.path.exists(path) else []
if cmd == "has":  # NAME ARCHIVE: listed for NAME, and the file is there
    name, archive = args
    sys.exit(0 if os.path.exists(archive) and any(e["name"] == name and e["archive"] == archive for e in entries) else 1)
if cmd == "archive-of":  # NAME IMAGE_ID: the archive saved from that very image, if it is still there
    name, image_id = args
    print(*[e["archive"] for e in entries if e["name"] == name and e.get("image_id") == image_id
            and os.path.exists(e["archive"])][:1])
    sys.exit(0)
if cmd == "tsv":
    for e in entries:
        print(e["reference"], e["digest"], e["archive"], sep="\t")
    sys.exit(0)
if cmd == "count":
    sys.exit(print(len(entries)))
if cmd == "put":
    name, reference, archive, digest, image_size, inputs, image_id = args
    entry = {"name": name, "reference": reference, "archive": archive, "digest": digest,
             "archive_bytes": os.path.getsize(archive), "image_size": image_size, "inputs": inputs,
             "image_id": image_id}
    entries = [e for e in entries if e["name"] != name] + [entry]
elif cmd == "drop-missing":
    for e in entries:
        if not os.path.exists(e["archive"]):
            print(f"dropping {e['name']} from the index: {e['archive']} is missing", file=sys.stderr)
    entries = [e for e in entries if os.path.exists(e["archive"])]
else:
    sys.exit(f"index: unknown command {cmd}")
tmp = f"{path}.tmp"
with open(tmp, "w") as f:
    json.dump(entries, f, indent=2)
    f.write("\n")
os.chmod(tmp, 0o644)
os.replace(tmp, path)
PY
}

build_image() {
  local name=$1 ref dockerfile context=$ROOT key inputs t0 archive args=()
  ref=$(reference_of "$name")
  dockerfile=images/$name/Dockerfile
  [ -f "$dockerfile" ] || die "no $dockerfile"

  if [ "$name" = pause ]; then
    # The sandbox image's one binary, compiled here (static: the image has no libc).
    context=$WORK/pause-context
    inputs=$( { cat images/pause/pause.c "$dockerfile"; gcc --version | head -n1; } | sha)
  else
    local sources
    mapfile -t sources < <(dockerfile_sources "$dockerfile")
    inputs=$( { echo "$dockerfile"; printf '%s\n' "${sources[@]}"; hash_paths "$dockerfile" "${sources[@]}"; } | sha)
    args=(--build-arg "BASE=$BASE_REF" --build-arg "PIP_CERT=/run/fieldkube-build/ca-certificates.crt"
      --volume "$HOST_CA:/run/fieldkube-build/ca-certificates.crt:ro")
    if [ "$name" = trainer ]; then
      find_horovod_wheel
      if [ -n "$HOROVOD_CONTEXT" ]; then
        args+=(--build-context "horovod-wheel=$HOROVOD_CONTEXT" --build-arg "HOROVOD_WHEEL_SHA256=$HOROVOD_SHA")
      fi
    fi
  fi
  key=$(printf '%s\n' "$ref" "$inputs" "${args[@]}" zstd | sha)
  archive=$IMAGES_DIR/$name-$key.tar
  if index has "$name" "$archive"; then
    log "$name: $ref up to date ($(basename "$archive"))"
    return
  fi

  local avail
  avail=$(df --output=avail -BG "$CACHE" | tail -n1 | tr -dc 0-9)
  [ "$avail" -ge "$MIN_FREE_GB" ] || die "$name: only ${avail} GB free under $CACHE; building the images needs ~$MIN_FREE_GB GB"

  if [ "$name" = pause ]; then
    rm -rf "$context" && mkdir -p "$context"
    gcc -Os -static -Wall -Wextra -Werror -o "$context/pause" images/pause/pause.c \
      || die "pause: compiling images/pause/pause.c failed (static linking needs libc6-dev)"
    strip "$context/pause"
  fi

  # The base is made only when an image is to be built: unchanged images need neither it nor buildah's
  # storage, only their archives (named by BASE_REF, which is a hash of the base's inputs).
  [ "$name" = pause ] || ensure_base
  log "$name: building $ref (buildah bud, log in $WORK/logs/$name.log)"
  t0=$(date +%s)
  run_logged "$name: buildah bud -f $dockerfile" "$WORK/logs/$name.log" \
    buildah bud --pull=never --layers --force-rm --network=host -f "$ROOT/$dockerfile" -t "$ref" "${args[@]}" "$context"
  log "$name: built in $(( $(date +%s) - t0 ))s; saving to $archive"
  save_image "$name" "$ref" "$archive" "$key"
}

# The image as an OCI archive named inside by its reference (ctr import names it so), and its index entry.
save_image() {
  local name=$1 ref=$2 archive=$3 key=$4 t0 image_id previous digest image_size
  t0=$(date +%s)
  image_id=$(buildah images --no-trunc --format '{{.ID}}' "$ref")
  previous=$(index archive-of "$name" "$image_id")
  if [ -n "$previous" ]; then
    # Inputs changed but not the image (every layer from the cache): the saved archive still holds it.
    digest=$(python3 -c 'import json, sys; print(*[e["digest"] for e in json.load(open(sys.argv[1])) if e["archive"] == sys.argv[2]])' "$INDEX" "$previous")
    [ "$previous" = "$archive" ] || mv "$previous" "$archive"
    log "$name: image unchanged ($digest), archive kept"
  else
    rm -f "$archive.tmp" "$WORK/digest"
    buildah push --quiet --compression-format zstd --digestfile "$WORK/digest" "$ref" "oci-archive:$archive.tmp:$ref" \
      >"$WORK/logs/$name-push.log" 2>&1 || { cat "$WORK/logs/$name-push.log" >&2; die "$name: buildah push to $archive failed"; }
    mv "$archive.tmp" "$archive"
    digest=$(cat "$WORK/digest")
  fi
  find "$IMAGES_DIR" -maxdepth 1 -name "$name-*.tar" ! -name "$(basename "$archive")" -delete
  image_size=$(buildah images --format '{{.Size}}' "$ref")  # uncompressed, as buildah shows it ("5.3 GB")
  index put "$name" "$ref" "$archive" "$digest" "$image_size" "$key" "$image_id"
  log "$name: saved $ref $digest ($image_size, archive $(du -h "$archive" | cut -f1)) in $(( $(date +%s) - t0 ))s"
  # The image this build replaced lost its tag: drop untagged images (with the cache layers only they
  # used), so the storage holds one image per name, not one per build. Without it every rebuild of the
  # trainer and serving images left gigabytes behind until the disk filled (15 GB after a day, 7 after).
  buildah rmi --prune >/dev/null 2>&1 || log "$name: could not drop untagged images (buildah rmi --prune); continuing"
}

cmd_build() {
  local images=("$@") name
  [ ${#images[@]} -gt 0 ] || images=("${ALL_IMAGES[@]}")
  for name in "${images[@]}"; do
    [[ " ${ALL_IMAGES[*]} " == *" $name "* ]] || die "unknown image '$name' (images: ${ALL_IMAGES[*]})"
  done
  setup_buildah build
  base_args
  check_shared_stage
  for name in "${images[@]}"; do
    build_image "$name"
  done
  index drop-missing   # entries whose archive was removed by hand
  log "done: $INDEX ($(index count) images) in $(( $(date +%s) - START ))s"
}

# --- importing into a containerd ------------------------------------------------------------------------
cmd_import() {
  local socket=${1:-} ns=${2:-k8s.io} have ref digest archive t0 imported=0
  [ -n "$socket" ] || die "usage: $0 import SOCKET [NAMESPACE]"
  [ -S "$socket" ] || die "no containerd socket at $socket"
  [ -f "$INDEX" ] || die "no $INDEX: run make images first"
  command -v ctr >/dev/null 2>&1 || die "ctr not found (Debian package containerd)"
  have=$(ctr --address "$socket" -n "$ns" images ls) || die "ctr cannot list images at $socket"
  while IFS=$'\t' read -r ref digest archive; do
    if awk -v r="$ref" -v d="$digest" '$1 == r && $3 == d { found = 1 } END { exit !found }' <<<"$have"; then
      log "import: $ref present ($digest)"
      continue
    fi
    [ -f "$archive" ] || die "import: $archive (for $ref) is missing: run make images"
    t0=$(date +%s)
    ctr --address "$socket" -n "$ns" images import --all-platforms "$archive" >/dev/null \
      || die "import: ctr images import $archive into $socket failed"
    ctr --address "$socket" -n "$ns" images ls | awk -v r="$ref" -v d="$digest" '$1 == r && $3 == d { f = 1 } END { exit !f }' \
      || die "import: after importing $archive, containerd has no $ref at $digest"
    log "import: $ref $digest in $(( $(date +%s) - t0 ))s"
    imported=$((imported + 1))
  done < <(index tsv)
  log "import: $imported imported into $socket (namespace $ns)"
}

case "${1:-build}" in
  build) shift $(( $# > 0 ? 1 : 0 )); cmd_build "$@" ;;
  import) shift; cmd_import "$@" ;;
  list) [ -f "$INDEX" ] || die "no $INDEX: run make images"; cat "$INDEX" ;;
  pause | operator | serving | trainer) cmd_build "$@" ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
  *) die "unknown command '$1' (build [IMAGE...] | import SOCKET [NAMESPACE] | list)" ;;
esac
