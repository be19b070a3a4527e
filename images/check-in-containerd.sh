#!/usr/bin/env bash
# Proves the images `make images` saved, the way the local node will use them: a throwaway containerd
# (its own root, state, socket and config in a temporary directory; CRI with restrict_oom_score_adj and
# cgroupfs, as on the node), `hack/build-images.sh import` into it, then `ctr run` of each image as its
# default user:
#   trainer   uid 1000; fieldkube-train/-prepare --help; torch + horovod.torch (Gloo and MPI); a 2-rank
#             mpirun allreduce as uid 1000; torchrun, horovodrun, mpirun, ssh present; no ssh host keys,
#             no compilers; sshd started by uid 1000 on port 2222 with keys from `ssh-keygen -A -f DIR`
#             and an ssh login to it with a fresh client key
#   serving   non-root; fieldkube-serve --help
#   operator  non-root; fieldkube-operator --help; no torch
#   pause     --version; exits 0 on SIGTERM as PID 1; reaps orphans of a container sharing its PID namespace
# Then it stops that containerd and removes everything it made (tasks, shims, mounts, cgroups, files).
# Usage: images/check-in-containerd.sh   (root; `make images-check` builds the images first)
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${FIELDKUBE_CACHE:-$HOME/.cache/fieldkube}
INDEX=${FIELDKUBE_IMAGES_DIR:-$CACHE/images}/index.json
START=$(date +%s)
FAILED=()

log() { printf '[check %4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
die() { printf '\033[31m[check] error:\033[0m %s\n' "$*" >&2; exit 1; }
ok() { log "ok: $*"; }
fail() { printf '\033[31m[check %4ss] FAILED: %s\033[0m\n' "$(( $(date +%s) - START ))" "$*" >&2; FAILED+=("$1"); }

[ "$(id -u)" -eq 0 ] || die "needs root (it starts a containerd)"
[ -f "$INDEX" ] || die "no $INDEX: run make images"
for tool in containerd ctr runc python3; do command -v "$tool" >/dev/null || die "$tool not found"; done
ref() { python3 -c 'import json, sys; print(*[e["reference"] for e in json.load(open(sys.argv[1])) if e["name"] == sys.argv[2]])' "$INDEX" "$1"; }
TRAINER=$(ref trainer) SERVING=$(ref serving) OPERATOR=$(ref operator) PAUSE=$(ref pause)
for r in TRAINER SERVING OPERATOR PAUSE; do [ -n "${!r}" ] || die "$INDEX has no ${r,,} image"; done

# --- the throwaway containerd -----------------------------------------------------------------------------
DIR=$(mktemp -d /tmp/fk-imgcheck.XXXXXX)   # short: a unix socket path must fit in 107 bytes
SOCK=$DIR/containerd.sock
CGROUP_PARENT=fk-imgcheck-$$             # every container's cgroup goes under this, removed at the end
CONTAINERD_PID=""

cleanup() {
  set +e
  if [ -S "$SOCK" ]; then
    local id
    for id in $(ctr --address "$SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$SOCK" -n k8s.io tasks kill -s SIGKILL "$id" >/dev/null 2>&1
      ctr --address "$SOCK" -n k8s.io tasks delete --force "$id" >/dev/null 2>&1
    done
    for id in $(ctr --address "$SOCK" -n k8s.io containers ls -q 2>/dev/null); do
      ctr --address "$SOCK" -n k8s.io containers rm "$id" >/dev/null 2>&1
    done
  fi
  if [ -n "$CONTAINERD_PID" ]; then
    kill -TERM "$CONTAINERD_PID" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$CONTAINERD_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$CONTAINERD_PID" 2>/dev/null
    wait "$CONTAINERD_PID" 2>/dev/null
  fi
  # Shims of this containerd only (their command line names its socket).
  local pid
  for pid in $(pgrep -f "containerd-shim.*-address $SOCK" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
  # Mounts left under its root (snapshots, shm), deepest first.
  awk -v d="$DIR" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
  local cg
  for cg in /sys/fs/cgroup/*/"$CGROUP_PARENT"; do
    [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  rm -rf "$DIR"
  if awk -v d="$DIR" 'index($5, d) == 1 { f = 1 } END { exit !f }' /proc/self/mountinfo || [ -e "$DIR" ] \
     || ls -d /sys/fs/cgroup/*/"$CGROUP_PARENT" >/dev/null 2>&1; then
    echo "[check] warning: leftovers of $DIR or cgroup $CGROUP_PARENT remain" >&2
  else
    log "cleaned up: containerd stopped, no mounts, cgroups or files of $DIR left"
  fi
}
trap cleanup EXIT

cat > "$DIR/config.toml" <<EOF
version = 2
root = "$DIR/root"
state = "$DIR/state"
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$DIR/opt"
[plugins."io.containerd.grpc.v1.cri"]
  # This VM denies a negative oom_score_adj (no CAP_SYS_RESOURCE): without this every sandbox fails.
  restrict_oom_score_adj = true
  sandbox_image = "$PAUSE"
  # No fixed port of the host's: the stream server on an ephemeral loopback port.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "$DIR/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
EOF
containerd --config "$DIR/config.toml" > "$DIR/containerd.log" 2>&1 &
CONTAINERD_PID=$!
for _ in $(seq 100); do ctr --address "$SOCK" version >/dev/null 2>&1 && break; sleep 0.1; done
ctr --address "$SOCK" version >/dev/null 2>&1 || { tail -20 "$DIR/containerd.log" >&2; die "containerd did not start"; }
log "containerd $(containerd --version | awk '{print $3}') up at $SOCK"

t0=$(date +%s)
hack/build-images.sh import "$SOCK" k8s.io
log "imported in $(( $(date +%s) - t0 ))s"
again=$(hack/build-images.sh import "$SOCK" k8s.io)
if grep -q 'import: 0 imported' <<<"$again"; then ok "a second import skips every image (same reference and digest)"
else fail "a second import imported again"; printf '%s\n' "$again" >&2; fi

# --- checks -------------------------------------------------------------------------------------------------
N=0
# run IMAGE CMD...: the image's default user, its own network namespace (loopback only); prints the output.
run() {
  local image=$1; shift
  N=$((N + 1))
  ctr --address "$SOCK" -n k8s.io run --rm --cgroup "/$CGROUP_PARENT/c$N" "$image" "fk-check-$N" "$@" 2>&1
}
# expect DESCRIPTION PATTERN IMAGE CMD...: the command exits 0 and its output matches PATTERN (grep -E).
expect() {
  local desc=$1 pattern=$2 out status=0; shift 2
  out=$(run "$@") || status=$?
  if [ "$status" -eq 0 ] && grep -qE "$pattern" <<<"$out"; then
    ok "$desc"
    printf '%s\n' "$out" | head -n 3 | sed 's/^/          | /'
  else
    fail "$desc (exit $status)"
    printf '%s\n' "$out" | tail -n 15 | sed 's/^/          | /' >&2
  fi
}

expect "trainer: default user is fieldkube 1000:1000, /opt/venv/bin first on PATH" \
  '^1000 1000 fieldkube /opt/venv/bin:' "$TRAINER" sh -c 'echo "$(id -u) $(id -g) $(id -un) $PATH"'
expect "trainer: fieldkube-train --help" 'usage: fieldkube-train' "$TRAINER" fieldkube-train --help
expect "trainer: fieldkube-prepare --help" 'usage: fieldkube-prepare' "$TRAINER" fieldkube-prepare --help
expect "trainer: import torch, horovod.torch (Gloo and MPI built)" '^torch 2\..* gloo True mpi True$' "$TRAINER" \
  python -c 'import torch, horovod.torch as hvd; print("torch", torch.__version__, "gloo", hvd.gloo_built(), "mpi", hvd.mpi_built())'
expect "trainer: torchrun, horovodrun, mpirun, ssh, sshd, ssh-keygen present; no gcc/cmake" '^tools ok$' "$TRAINER" sh -c \
  'for t in torchrun horovodrun mpirun ssh sshd ssh-keygen; do command -v $t >/dev/null || { echo "missing $t"; exit 1; }; done
   for t in gcc g++ cmake; do command -v $t >/dev/null && { echo "compiler $t present"; exit 1; }; done; echo tools ok'
expect "trainer: no ssh host keys in the image; /home/fieldkube/.ssh owned by 1000" '^keys 0 home 1000 700$' "$TRAINER" sh -c \
  'echo "keys $(ls /etc/ssh/ssh_host_* 2>/dev/null | wc -l) home $(stat -c %u /home/fieldkube/.ssh) $(stat -c %a /home/fieldkube/.ssh)"'
# One write per line: the image sets PYTHONUNBUFFERED, and print() of several values writes each one.
expect "trainer: mpirun -np 2 allreduce through Horovod as uid 1000" '^rank 0: sum 3\.0 size 2$' "$TRAINER" \
  mpirun -np 2 python -c \
  'import sys, torch, horovod.torch as hvd; hvd.init(); s = hvd.allreduce(torch.tensor([hvd.rank() + 1.0]), op=hvd.Sum); hvd.rank() == 0 and sys.stdout.write(f"rank 0: sum {s.item()} size {hvd.size()}\n")'
# The workers' sshd, as the operator runs it: non-root, port 2222, host keys made at start.
expect "trainer: sshd as uid 1000 on :2222 (keys from ssh-keygen -A -f), ssh login with a client key" \
  '^login fieldkube uid 1000 venv ok$' "$TRAINER" sh -c '
    set -eu
    d=$(mktemp -d); mkdir -p "$d/etc/ssh"
    ssh-keygen -A -f "$d" >/dev/null
    ssh-keygen -q -t ed25519 -N "" -f "$d/client"; cp "$d/client.pub" "$d/authorized_keys"
    /usr/sbin/sshd -D -e -f /dev/null -p 2222 -h "$d/etc/ssh/ssh_host_ed25519_key" -o PidFile="$d/sshd.pid" \
      -o UsePAM=no -o StrictModes=no -o AuthorizedKeysFile="$d/authorized_keys" 2>"$d/sshd.log" &
    for i in $(seq 50); do
      out=$(ssh -p 2222 -i "$d/client" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o LogLevel=ERROR fieldkube@127.0.0.1 "echo login \$(id -un) uid \$(id -u) venv \$(test -x /opt/venv/bin/fieldkube-train && echo ok)" 2>&1) \
        && break || sleep 0.2
    done
    echo "$out"; echo "sshd pid $(cat "$d/sshd.pid") user $(ps -o user= -p "$(cat "$d/sshd.pid")" 2>/dev/null || id -un)"
    kill "$(cat "$d/sshd.pid")"; sed -n 1,3p "$d/sshd.log"'

expect "serving: non-root user" '^65532 fieldkube$' "$SERVING" sh -c 'echo "$(id -u) $(id -un)"'
expect "serving: fieldkube-serve --help" 'usage: fieldkube-serve' "$SERVING" fieldkube-serve --help
expect "operator: non-root user" '^65532 fieldkube$' "$OPERATOR" sh -c 'echo "$(id -u) $(id -un)"'
expect "operator: fieldkube-operator --help" 'usage: fieldkube-operator' "$OPERATOR" fieldkube-operator --help
expect "operator: no torch" '^no torch$' "$OPERATOR" sh -c 'python -c "import torch" 2>/dev/null && echo "torch present" || echo "no torch"'

expect "pause: --version" '^fieldkube-pause ' "$PAUSE" /pause --version
# As PID 1: SIGTERM ends it with status 0; orphans of a container in its PID namespace are reaped.
N=$((N + 1)); pause_id=fk-check-$N
ctr --address "$SOCK" -n k8s.io run --cgroup "/$CGROUP_PARENT/c$N" "$PAUSE" "$pause_id" >/dev/null 2>&1 &
pause_ctr=$!
for _ in $(seq 50); do
  pause_pid=$(ctr --address "$SOCK" -n k8s.io tasks ls 2>/dev/null | awk -v id="$pause_id" '$1 == id && $3 == "RUNNING" { print $2 }')
  [ -n "$pause_pid" ] && break; sleep 0.1
done
if [ -z "$pause_pid" ]; then
  fail "pause: did not start"
else
  N=$((N + 1))
  ctr --address "$SOCK" -n k8s.io run --rm --cgroup "/$CGROUP_PARENT/c$N" --with-ns "pid:/proc/$pause_pid/ns/pid" \
    "$OPERATOR" "fk-check-$N" sh -c '(sleep 1 &); (sleep 1 &); sleep 3' >/dev/null 2>&1 &
  sharer=$!
  children() { ps -o stat= --ppid "$pause_pid" || true; }   # ps exits 1 when there are none
  sleep 0.8; orphans=$(children | wc -l)
  sleep 1.2; zombies=$(children | grep -c '^Z' || true); left=$(children | wc -l)
  wait "$sharer" || true
  if [ "$orphans" -ge 2 ] && [ "$zombies" -eq 0 ] && [ "$left" -eq 0 ]; then
    ok "pause: reaped $orphans orphans re-parented to it (no zombies left)"
  else
    fail "pause: orphans $orphans, zombies $zombies, children left $left after they exited"
  fi
  ctr --address "$SOCK" -n k8s.io tasks kill -s SIGTERM "$pause_id" >/dev/null
  status=0; wait "$pause_ctr" || status=$?
  ctr --address "$SOCK" -n k8s.io containers rm "$pause_id" >/dev/null 2>&1 || true
  if [ "$status" -eq 0 ]; then ok "pause: SIGTERM as PID 1 -> exit 0"; else fail "pause: SIGTERM -> exit $status"; fi
fi

if [ ${#FAILED[@]} -gt 0 ]; then
  die "${#FAILED[@]} check(s) failed: ${FAILED[*]}"
fi
log "all checks passed"
