"""The trainer pods' contract with their image: non-root, read-only root, and the workers' own sshd.

The trainer image provides user `fieldkube` (uid/gid 1000, home /home/fieldkube), its venv on the image's
PATH, openssh-server, openssh-client and openmpi-bin, and no ssh host keys. From that, every launcher and
worker pod runs as uid 1000 without capabilities on a read-only root filesystem; the paths that must be
writable are emptyDirs. Workers do not rely on the image's CMD: they make fresh host keys at start and run
sshd as uid 1000 on an unprivileged port, and the launcher's mpirun points its ssh client at that port.
Pure data and functions: the builder (`mpijob_builder.py`) assembles them into the MPIJob.
"""

from __future__ import annotations

import shlex
from typing import Any

TRAINER_UID = 1000
TRAINER_HOME = "/home/fieldkube"
# The mpi-operator mounts its generated key pair and authorized_keys here (its `sshAuthMountPath`).
SSH_AUTH_MOUNT_PATH = f"{TRAINER_HOME}/.ssh"
# Unprivileged, so a non-root sshd can listen on it (the mpi-operator's own images use the same port).
SSH_PORT = 2222
SSHD_DIR = "/run/fieldkube-sshd"
SSHD_HOST_KEY = f"{SSHD_DIR}/ssh_host_ed25519_key"
TMP_DIR = "/tmp"
SHM_DIR = "/dev/shm"

# HOME is on the read-only root: libraries that cache or configure under it write to /tmp instead
# (matplotlib, torch hub and fontconfig via XDG_CACHE_HOME, MLflow's installation id via XDG_CONFIG_HOME,
# Triton's kernel cache via TRITON_HOME).
RUNTIME_ENV: tuple[tuple[str, str], ...] = (
    ("PYTHONUNBUFFERED", "1"),
    ("MPLCONFIGDIR", f"{TMP_DIR}/matplotlib"),
    ("XDG_CACHE_HOME", f"{TMP_DIR}/.cache"),
    ("XDG_CONFIG_HOME", f"{TMP_DIR}/.config"),
    ("TRITON_HOME", TMP_DIR),
)
# Ranks on workers start in an ssh session, whose environment is sshd's, not the image's: without these
# the venv's `fieldkube-train` and `torchrun` are not on PATH there. mpirun forwards them from the launcher
# (same image). An unset one is skipped with a one-line warning by mpirun (OpenMPI 4.1), not an error.
IMAGE_ENV_FORWARDED = ("PATH", "LD_LIBRARY_PATH")

# The launcher's ssh client: the workers' port, no prompt for their fresh host keys and nowhere to record
# them (~/.ssh is a read-only secret volume), the mpi-operator's ConnectionAttempts kept (its env value is
# overridden by this command-line one), and no "Permanently added" line per worker in the launcher's log.
SSH_CLIENT_ARGS = (
    f"-p {SSH_PORT}",
    "-o StrictHostKeyChecking=no",
    "-o UserKnownHostsFile=/dev/null",
    "-o ConnectionAttempts=10",
    "-o LogLevel=ERROR",
)

# sshd reads no image configuration (`-f /dev/null`): everything it does is on this list.
SSHD_OPTIONS: tuple[tuple[str, str], ...] = (
    ("PidFile", f"{SSHD_DIR}/sshd.pid"),
    ("UsePAM", "no"),
    ("PasswordAuthentication", "no"),
    ("KbdInteractiveAuthentication", "no"),
    ("PermitRootLogin", "no"),
    ("AuthorizedKeysFile", f"{SSH_AUTH_MOUNT_PATH}/authorized_keys"),
    # The secret volume's directory is world-writable (tmpfs, mode 1777 + setgid by fsGroup), which
    # StrictModes refuses ("bad ownership or modes for directory"); the files in it are root-owned, read-only.
    ("StrictModes", "no"),
    ("AllowTcpForwarding", "no"),
    ("AllowAgentForwarding", "no"),
    ("X11Forwarding", "no"),
)


def worker_command() -> list[str]:
    """The worker container's argv: fresh host keys in an emptyDir, then sshd as uid 1000 in the foreground.

    One ed25519 host key: the only client is the launcher's OpenSSH from the same image, and it takes
    milliseconds where `ssh-keygen -A` spends about a second on RSA at every start. The old key is removed
    first because a restarted container (restartPolicy OnFailure) keeps its emptyDir and ssh-keygen refuses
    to overwrite without a terminal. `exec`: sshd is the container's PID 1 and gets the pod's SIGTERM.
    """
    key = shlex.quote(SSHD_HOST_KEY)
    sshd = ["/usr/sbin/sshd", "-D", "-e", "-f", "/dev/null", "-p", str(SSH_PORT), "-h", SSHD_HOST_KEY]
    for name, value in SSHD_OPTIONS:
        sshd += ["-o", f"{name}={value}"]
    script = "; ".join(
        [
            "set -eu",
            f"rm -f {key} {key}.pub",
            f"ssh-keygen -q -t ed25519 -N '' -C '' -f {key}",
            "exec " + shlex.join(sshd),
        ]
    )
    return ["/bin/sh", "-c", script]


def pod_security_context() -> dict[str, Any]:
    """uid/gid 1000 for every process; volumes group-owned by 1000 so the trainer can write them."""
    return {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID,
        "runAsGroup": TRAINER_UID,
        "fsGroup": TRAINER_UID,
        # Re-own a volume only when its root does not already match: a dataset PVC is not walked at
        # every pod start.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """Nothing to escalate to and nothing to write outside the emptyDirs and volumes."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }


def scratch_volumes(
    *, worker: bool, shm_size: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The emptyDirs a read-only root needs: /tmp (mpirun's session directory, torch, MLflow, the caches
    above) on both roles; on workers also sshd's key and pid directory and a memory-backed /dev/shm (the
    runtime's default is 64 MiB, too small for DataLoader workers and MPI's shared-memory transport)."""
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": TMP_DIR}]
    if worker:
        shm: dict[str, Any] = {"medium": "Memory"}
        if shm_size is not None:
            shm["sizeLimit"] = shm_size
        volumes += [{"name": "sshd", "emptyDir": {}}, {"name": "shm", "emptyDir": shm}]
        mounts += [{"name": "sshd", "mountPath": SSHD_DIR}, {"name": "shm", "mountPath": SHM_DIR}]
    return volumes, mounts


def runtime_env() -> list[dict[str, str]]:
    return [{"name": name, "value": value} for name, value in RUNTIME_ENV]


def ssh_client_args() -> str:
    """The value of OpenMPI's `plm_rsh_args` (one string: mpirun splits it into ssh's argv)."""
    return " ".join(SSH_CLIENT_ARGS)
