"""fieldkube-operator: run the operator, or print the CRDs it is generated from.

fieldkube-operator run [--namespace NS]... [--mlflow-tracking-uri URI] [--metrics-port 8080]
                       [--mlflow-credentials-secret NAME [--mlflow-credentials-env VAR,...]]
                       [--health-port 8081] [--bind-address 0.0.0.0]
                       [--standalone | --lease-namespace NS --lease-name NAME] [--workers 16]
                       [--status-writes-per-second 20]
fieldkube-operator crd > manifests/crd/trainingjobs.yaml
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from fieldkube.operator.workqueue import DEFAULT_WORKERS
from fieldkube.operator.write_budget import DEFAULT_WRITES_PER_SECOND

# The MLflow client's own credential variables (basic auth); object-store keys are added by the user.
DEFAULT_CREDENTIALS_ENV = "MLFLOW_TRACKING_USERNAME,MLFLOW_TRACKING_PASSWORD"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fieldkube-operator", description="TrainingJob → MPIJob operator.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="reconcile TrainingJobs (cluster-wide unless --namespace is given)")
    run.add_argument("--namespace", "-n", action="append", default=[], help="watch only this namespace")
    run.add_argument("--mlflow-tracking-uri", default=os.environ.get("FIELDKUBE_MLFLOW_TRACKING_URI"))
    run.add_argument(
        "--mlflow-credentials-secret",
        default=os.environ.get("FIELDKUBE_MLFLOW_CREDENTIALS_SECRET"),
        help="Secret (in each TrainingJob's namespace) given to trainer pods through envFrom: the MLflow "
        "client's credentials",
    )
    run.add_argument(
        "--mlflow-credentials-env",
        default=os.environ.get("FIELDKUBE_MLFLOW_CREDENTIALS_ENV", DEFAULT_CREDENTIALS_ENV),
        help="comma-separated variables of that Secret that mpirun forwards to every rank "
        f"(default {DEFAULT_CREDENTIALS_ENV})",
    )
    run.add_argument(
        "--metrics-port", type=int, default=int(os.environ.get("FIELDKUBE_METRICS_PORT", "8080"))
    )
    run.add_argument("--health-port", type=int, default=int(os.environ.get("FIELDKUBE_HEALTH_PORT", "8081")))
    run.add_argument(
        "--bind-address",
        default=os.environ.get("FIELDKUBE_BIND_ADDRESS", "0.0.0.0"),
        help="address of the metrics and health servers (0.0.0.0 in a pod; 127.0.0.1 on a workstation)",
    )
    run.add_argument(
        "--standalone", action="store_true", help="no leader election (only when one replica runs)"
    )
    run.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE")
        or os.environ.get("FIELDKUBE_LEASE_NAMESPACE", "fieldkube-system"),
        help="namespace of the Lease the replicas elect a leader with (default: the pod's namespace)",
    )
    run.add_argument(
        "--lease-name",
        default=os.environ.get("FIELDKUBE_LEASE_NAME", "fieldkube-operator"),
        help="the Lease's name",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("FIELDKUBE_WORKERS", str(DEFAULT_WORKERS))),
        help="threads syncing jobs in parallel",
    )
    run.add_argument(
        "--status-writes-per-second",
        type=float,
        default=float(os.environ.get("FIELDKUBE_STATUS_WRITES_PER_SECOND", str(DEFAULT_WRITES_PER_SECOND))),
        help="status writes of all jobs together, on average (bursts of 50 go at once); MPIJob creation "
        f"is not limited (default {DEFAULT_WRITES_PER_SECOND:g})",
    )
    run.add_argument("--verbose", action="store_true")
    sub.add_parser("crd", help="print the CustomResourceDefinitions (YAML)")
    return parser


def credentials_env_names(raw: str) -> tuple[str, ...] | None:
    """`A,B` → ("A", "B"); None when a name is not a valid environment variable name."""
    names = tuple(part.strip() for part in raw.split(",") if part.strip())
    if not all(_ENV_NAME.fullmatch(name) for name in names):
        return None
    return names


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "crd":
        from fieldkube.operator.crd import render_crds

        sys.stdout.write(render_crds())
        return
    if args.mlflow_tracking_uri:
        os.environ["FIELDKUBE_MLFLOW_TRACKING_URI"] = args.mlflow_tracking_uri
    if args.mlflow_credentials_secret:
        names = credentials_env_names(args.mlflow_credentials_env)
        if names is None:
            sys.exit(
                "fieldkube-operator: error: --mlflow-credentials-env must be comma-separated environment "
                f"variable names (got {args.mlflow_credentials_env!r})"
            )
        os.environ["FIELDKUBE_MLFLOW_CREDENTIALS_SECRET"] = args.mlflow_credentials_secret
        os.environ["FIELDKUBE_MLFLOW_CREDENTIALS_ENV"] = ",".join(names)
    if args.workers < 1:
        sys.exit(f"fieldkube-operator: error: --workers must be at least 1 (got {args.workers})")
    if args.status_writes_per_second <= 0:
        sys.exit(
            "fieldkube-operator: error: --status-writes-per-second must be positive "
            f"(got {args.status_writes_per_second:g})"
        )
    os.environ["FIELDKUBE_WORKERS"] = str(args.workers)
    os.environ["FIELDKUBE_STATUS_WRITES_PER_SECOND"] = str(args.status_writes_per_second)
    os.environ["FIELDKUBE_NAMESPACES"] = ",".join(args.namespace)
    os.environ["FIELDKUBE_LEADER_ELECTION"] = "0" if args.standalone else "1"
    os.environ["FIELDKUBE_LEASE_NAMESPACE"] = args.lease_namespace
    os.environ["FIELDKUBE_LEASE_NAME"] = args.lease_name
    os.environ["FIELDKUBE_METRICS_PORT"] = str(args.metrics_port)
    os.environ["FIELDKUBE_BIND_ADDRESS"] = args.bind_address
    import kopf

    import fieldkube.operator.handlers  # noqa: F401  (registers the handlers)
    from fieldkube.operator.kube import CredentialsError, load_config

    try:  # fail with one line, before kopf starts, when there is no cluster to talk to
        load_config()
    except CredentialsError as exc:
        sys.exit(f"fieldkube-operator: error: {exc}")

    kopf.configure(verbose=args.verbose, log_prefix=True)  # one handler for kopf's and our loggers
    if not args.verbose:
        # kopf logs "Handler 'trainingjob_event' succeeded." for every TrainingJob event: in a burst of
        # 1,000 jobs that line was a third of the CPU of kopf's thread. Its warnings and errors stay.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=True,  # kopf's peering is not used: the operator elects a leader on a Lease
        liveness_endpoint=f"http://{args.bind_address}:{args.health_port}/healthz"
        if args.health_port
        else None,
    )


if __name__ == "__main__":
    main()
