"""fieldkube-scale --cluster: the scaling sweep as TrainingJobs, one per worker count, results from MLflow.

    fieldkube-scale --cluster --template manifests/examples/counter-cpu.yaml --namespace sweeps \\
        --mlflow-uri http://mlflow:5000 --workers 1,2 --launcher horovod --steps 20 --batch 4 --out scale/

The local sweep measures processes on one machine; this one measures what users run: each count is a
TrainingJob the operator turns into an MPIJob, so pod start-up, the network between worker pods and the
trainer image are what is timed. Jobs run one after another (side by side they would share the nodes)
and the sweep waits on each one's status. Each job's run is found in MLflow by its `fieldkube.job.uid`
tag: steady-state images/s is the trainer's `fieldkube.train_images_per_second` tag, the loss curve is
the run's `train_loss` history (seconds since the run started). Tables and plot are the local sweep's
(`scaling_table`, `plot`); scale.json, scale.md, scale.csv and scale.png are also logged as artifacts of
one sweep run in the jobs' experiment.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import logging
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from fieldkube.contract.names import JOB_UID_TAG, TRAIN_LOSS
from fieldkube.trainer.dataset_format import write_json_atomic
from fieldkube.trainer.errors import ConfigError, DataError

log = logging.getLogger("fieldkube.scale")
GROUP, VERSION, PLURAL = "fieldkube.io", "v1alpha1", "trainingjobs"
BACKENDS = ("horovod", "ddp")  # --launcher values that are a TrainingJob's runtime.backend
SWEEP_LABEL = "fieldkube.io/scale-sweep"
RATE_TAG = "fieldkube.train_images_per_second"


def check_flags(args: argparse.Namespace, strategies: list[str]) -> str:
    """The runtime.backend of every job, after refusing what a TrainingJob cannot express."""
    if strategies != ["allreduce"]:
        raise ConfigError(
            f"--strategy {','.join(strategies)}: --cluster runs allreduce only (PS strategies are local-only)"
        )
    if args.ps is not None or args.staleness is not None:
        raise ConfigError("--ps/--staleness: parameter servers are local-only, not with --cluster")
    if args.data is not None:
        raise ConfigError(
            "--data: with --cluster the dataset is a PVC (--dataset-pvc/--dataset-path or --template)"
        )
    backend = args.launcher or "horovod"
    if backend not in BACKENDS:
        raise ConfigError(f"--launcher {backend}: with --cluster expected one of {', '.join(BACKENDS)}")
    if args.steps < 2:
        raise ConfigError(f"--steps {args.steps}: expected >= 2 (the first step is not timed)")
    if args.batch < 1 or args.threads_per_worker < 1 or args.repeat < 1 or args.poll <= 0:
        raise ConfigError("--batch, --threads-per-worker, --repeat and --poll: expected > 0")
    if args.template is None and not (args.dataset_pvc and args.dataset_path):
        raise ConfigError(
            "--dataset-pvc and --dataset-path: required with --cluster unless --template is given"
        )
    return backend


def base_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainingJob spec every job starts from: --template's, or one CPU job made from the flags."""
    if args.template is not None:
        try:
            doc = yaml.safe_load(Path(args.template).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"--template {args.template}: cannot read a YAML TrainingJob ({exc})") from None
        if (
            not isinstance(doc, dict)
            or doc.get("kind") != "TrainingJob"
            or not isinstance(doc.get("spec"), dict)
        ):
            raise ConfigError(
                f"--template {args.template}: expected a TrainingJob (kind: TrainingJob with a spec)"
            )
        spec: dict[str, Any] = copy.deepcopy(doc["spec"])
    else:
        spec = {"gpusPerWorker": 0, "resources": {"cpu": args.cpu, "memory": args.memory}}
    if args.dataset_pvc:
        spec["dataset"] = {**spec.get("dataset", {}), "pvc": args.dataset_pvc}
    if args.dataset_path:
        spec["dataset"] = {**spec.get("dataset", {}), "path": args.dataset_path}
    if args.image:
        spec["image"] = args.image
    mlflow = dict(spec.get("mlflow") or {})
    if args.mlflow_uri:
        mlflow["trackingUri"] = args.mlflow_uri
    if args.experiment:
        mlflow["experiment"] = args.experiment
    if not str(mlflow.get("trackingUri", "")).startswith(("http://", "https://")):
        raise ConfigError(
            "--mlflow-uri: expected an http(s) MLflow server that the pods and this machine reach"
        )
    mlflow.setdefault("experiment", "fieldkube-scale")
    mlflow.setdefault("registerModel", False)
    spec["mlflow"] = mlflow
    # A shared checkpoint path would make each job resume from the previous one's steps.
    spec.pop("checkpoint", None)
    return spec


def job_document(
    spec: dict[str, Any], name: str, sweep: str, workers: int, backend: str, args: argparse.Namespace
) -> dict[str, Any]:
    """One sweep job: `workers` workers, a fixed number of steps at a fixed per-worker batch."""
    spec = copy.deepcopy(spec)
    training = spec.setdefault("training", {})
    train = training.setdefault("train", {})
    train.update(
        batch_size=args.batch, batch_mode="per_worker", max_steps=args.steps, epochs=100000,
        log_every_steps=1, evaluate=False,
    )  # fmt: skip
    training.setdefault("runtime", {}).update(backend=backend, threads=args.threads_per_worker)
    spec["workers"] = workers
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingJob",
        "metadata": {"name": name, "labels": {SWEEP_LABEL: sweep}},
        "spec": spec,
    }


def kube_api(kubeconfig: str | None) -> Any:
    """A CustomObjectsApi client; a one-line error when no cluster answers."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        api_client = config.new_client_from_config(config_file=kubeconfig)
    except (ConfigException, OSError, TypeError) as exc:
        where = kubeconfig or "the default kubeconfig"
        raise ConfigError(f"--kubeconfig: cannot load {where}: {exc}") from None
    api_client.configuration.retries = 1
    try:
        client.VersionApi(api_client).get_code(_request_timeout=10)
    except Exception as exc:
        host = api_client.configuration.host
        raise DataError(f"cluster at {host} unreachable: {type(exc).__name__}: {str(exc)[:160]}") from None
    return client.CustomObjectsApi(api_client)


def submit(api: Any, namespace: str, doc: dict[str, Any]) -> str:
    """Create the TrainingJob; returns its uid."""
    from kubernetes.client.exceptions import ApiException

    try:
        made = api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, doc)
    except ApiException as exc:
        reason = exc.reason if not exc.body else str(exc.body)[:300]
        raise DataError(f"TrainingJob {namespace}/{doc['metadata']['name']} refused: {reason}") from None
    return str(made["metadata"]["uid"])


def wait_done(
    api: Any, namespace: str, name: str, timeout: float, poll: float
) -> tuple[dict[str, Any], float]:
    """Poll the TrainingJob until Succeeded or Failed, logging phase, progress, elapsed and ETA; returns the
    final status and the seconds it took."""
    began, last = time.monotonic(), ""
    while (elapsed := time.monotonic() - began) < timeout:
        job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        status: dict[str, Any] = job.get("status") or {}
        phase = status.get("phase") or "Pending"
        if phase in ("Succeeded", "Failed"):
            log.info("%s: %s after %.0fs", name, phase, elapsed)
            return status, elapsed
        percent = (status.get("progress") or {}).get("percent")
        eta = f"{elapsed * (100 - percent) / percent:.0f}s" if percent else "?"
        line = f"{name}: {phase}" + (f" {percent:.0f}%" if percent is not None else "")
        if line != last or int(elapsed) % 30 < poll:
            log.info("%s, %.0fs elapsed, ETA %s", line, elapsed, eta)
            last = line
        time.sleep(poll)
    raise DataError(f"TrainingJob {namespace}/{name} did not finish within {timeout:.0f}s (--timeout)")


def run_results(tracking: Any, experiment: str, uid: str) -> dict[str, Any]:
    """What a job's MLflow run says: steady-state images/s, backend, world size, seconds, loss curve
    ([seconds since the run started, step, loss] as the local sweep's loss_curve.json)."""
    found = tracking.get_experiment_by_name(experiment)
    runs = []
    if found:
        query = f"tags.`{JOB_UID_TAG}` = '{uid}'"
        order = ["attributes.start_time DESC"]
        runs = tracking.search_runs([found.experiment_id], query, max_results=1, order_by=order)
    if not runs:
        raise DataError(f"no MLflow run in experiment {experiment!r} tagged {JOB_UID_TAG}={uid}")
    run = runs[0]
    tags = run.data.tags
    if RATE_TAG not in tags:
        raise DataError(f"MLflow run {run.info.run_id} has no {RATE_TAG} tag (did the training finish?)")
    history = sorted(tracking.get_metric_history(run.info.run_id, TRAIN_LOSS), key=lambda m: m.step)
    start = run.info.start_time
    return {
        "run_id": run.info.run_id,
        "images_per_second": float(tags[RATE_TAG]),
        "backend": tags.get("fieldkube.backend"),
        "world_size": int(tags["fieldkube.world_size"]) if "fieldkube.world_size" in tags else None,
        "seconds": float(tags["fieldkube.seconds_this_run"])
        if "fieldkube.seconds_this_run" in tags
        else None,
        "loss_curve": [[round((m.timestamp - start) / 1000, 3), m.step, m.value] for m in history],
    }


def rows_from_results(samples: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The local sweep's run rows (median over rounds) from each worker count's job results."""
    from fieldkube.trainer.scale_quality import final_loss

    rows = []
    for workers, trials in sorted(samples.items()):
        rates = [t["images_per_second"] for t in trials]
        finals = [f for t in trials if (f := final_loss(t["loss_curve"])) is not None]
        rows.append(
            {
                "strategy": "allreduce",
                "workers": workers,
                "servers": 0,
                "images_per_second": round(statistics.median(rates), 3),
                "images_per_second_rounds": [round(r, 3) for r in rates],
                "backend": trials[0].get("backend"),
                "wall_seconds": round(statistics.median(t["seconds"] or 0.0 for t in trials), 3),
                "job_seconds": round(statistics.median(t["job_seconds"] for t in trials), 1),
                "final_loss": round(statistics.median(finals), 4) if finals else None,
                "jobs": [t["job"] for t in trials],
                "run_ids": [t["run_id"] for t in trials],
                "loss_curves": [t["loss_curve"] for t in trials],
            }
        )
    return rows


COLUMNS = (
    ("strategy", "strategy"), ("backend", "backend"), ("workers", "workers"),
    ("images_per_second", "images/s"), ("speedup", "speedup"), ("efficiency", "efficiency per worker"),
    ("time_to_target_seconds", "time to target loss, s"), ("final_loss", "final training loss"),
    ("wall_seconds", "training s"),
)  # fmt: skip


def write_tables(table: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """scale.md and scale.csv: one row per strategy and worker count, the columns of the seeds' tables."""
    keys = [k for k, _ in COLUMNS]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(keys)
    for row in table:
        writer.writerow(["" if row.get(k) is None else row[k] for k in keys])

    def cell(key: str, value: Any) -> str:
        if value is None:
            return "—"
        if key == "efficiency":
            return f"{100 * value:.0f} %"
        return f"{value:.2f}x" if key == "speedup" else str(value)

    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(k, row.get(k)) for k in keys) + " |" for row in table]
    md, csv_path = out / "scale.md", out / "scale.csv"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    csv_path.write_text(buffer.getvalue(), encoding="utf-8")
    return md, csv_path


def log_sweep(tracking: Any, experiment: str, name: str, result: dict[str, Any], files: list[Path]) -> str:
    """One MLflow run holding the sweep's figures (a metric per worker count) and its output files."""
    found = tracking.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else tracking.create_experiment(experiment)
    run = tracking.create_run(experiment_id, run_name=name, tags={SWEEP_LABEL: name})
    run_id: str = run.info.run_id
    for key in ("steps", "batch_per_worker", "threads_per_worker", "repeat", "backend", "namespace"):
        tracking.log_param(run_id, key, str(result[key]))
    for row in result["runs"]:
        tracking.log_metric(run_id, "images_per_second", row["images_per_second"], step=row["workers"])
        tracking.log_metric(run_id, "efficiency", row["efficiency"], step=row["workers"])
    for path in files:
        tracking.log_artifact(run_id, str(path))
    tracking.set_terminated(run_id, "FINISHED")
    return run_id


def run_cluster(args: argparse.Namespace, counts: list[int], strategies: list[str]) -> dict[str, Any]:
    """Submit one TrainingJob per count and round, one at a time; tables, plot and sweep run from MLflow."""
    from mlflow.tracking import MlflowClient

    from fieldkube.trainer.scale import add_time_to_target, plot, scaling_table

    backend = check_flags(args, strategies)
    spec = base_spec(args)
    uri, experiment = spec["mlflow"]["trackingUri"], spec["mlflow"]["experiment"]
    api = kube_api(args.kubeconfig)
    tracking = MlflowClient(tracking_uri=uri)
    sweep = args.name_prefix or "scale-" + datetime.now(UTC).strftime("%m%d-%H%M%S")
    samples: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    began, done, total = time.monotonic(), 0, args.repeat * len(counts)
    for round_index in range(args.repeat):
        for workers in counts:
            name = f"{sweep}-{backend}-w{workers}" + (f"-r{round_index + 1}" if args.repeat > 1 else "")
            uid = submit(api, args.namespace, job_document(spec, name, sweep, workers, backend, args))
            log.info(
                "submitted %s/%s (%d worker(s), %d steps, uid %s)",
                args.namespace,
                name,
                workers,
                args.steps,
                uid,
            )
            status, seconds = wait_done(api, args.namespace, name, args.timeout, args.poll)
            if status.get("phase") != "Succeeded":
                why = status.get("message") or (status.get("diagnosis") or {}).get("message") or "no message"
                raise DataError(f"TrainingJob {args.namespace}/{name} {status.get('phase')}: {why}")
            trial = run_results(tracking, experiment, uid)
            trial.update(job=name, job_seconds=seconds)
            samples[workers].append(trial)
            done += 1
            eta = (time.monotonic() - began) / done * (total - done)
            log.info(
                "%s: %.2f images/s, %d loss points | job %d/%d, sweep ETA %.0fs",
                name, trial["images_per_second"], len(trial["loss_curve"]), done, total, eta,
            )  # fmt: skip
    table = scaling_table(rows_from_results(samples))
    curves = all(c for row in table for c in row["loss_curves"])
    target = add_time_to_target(table, args.target_loss) if curves else float("nan")
    result = {
        "cluster": True,
        "namespace": args.namespace,
        "experiment": experiment,
        "sweep": sweep,
        "image": spec.get("image"),
        "backend": backend,
        "strategies": strategies,
        "steps": args.steps,
        "batch_per_worker": args.batch,
        "threads_per_worker": args.threads_per_worker,
        "repeat": args.repeat,
        "target_loss": round(target, 4) if curves else None,
        "runs": table,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "scale.json", result)
    md, csv_path = write_tables(table, args.out)
    title = (
        f"TrainingJobs {args.namespace}/{sweep}-*, {backend}, batch {args.batch}/worker, "
        f"{args.steps} steps/worker, {args.repeat} round(s)"
    )
    plot(table, title, target, args.out / "scale.png")
    result["sweep_run_id"] = log_sweep(
        tracking, experiment, sweep, result, [args.out / "scale.json", md, csv_path, args.out / "scale.png"]
    )
    write_json_atomic(args.out / "scale.json", result)
    print(md.read_text(encoding="utf-8"), end="")
    print(f"wrote {args.out}/scale.json, scale.md, scale.csv, scale.png; MLflow run {result['sweep_run_id']}")
    return result
