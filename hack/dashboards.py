"""Generate fieldkube's Grafana dashboards and Prometheus rules from one compact description.

Dashboards are data, but hand-edited Grafana JSON drifts (panel ids, grid positions, datasource refs):
keeping the queries here, one line each, makes them reviewable and lets the tests evaluate every one of
them against a real Prometheus. The JSON itself is built with grafana-foundation-sdk's typed builders, so
its shape follows Grafana's own schema rather than a hand-kept copy of it.
`python hack/dashboards.py` rewrites charts/fieldkube/files/ (dashboards/<uid>.json, prometheus-rules.yaml),
which the chart ships as ConfigMaps and a PrometheusRule; `--check` fails when the committed files differ
from what this script generates. `hack/render_dashboards.py` draws the same panels to PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.common import VizLegendOptions
from grafana_foundation_sdk.builders.dashboard import Dashboard as DashboardBuilder
from grafana_foundation_sdk.builders.dashboard import DatasourceVariable, QueryVariable
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh
from grafana_foundation_sdk.models.dashboard import Panel as GrafanaPanel
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT = Path(__file__).resolve().parents[1] / "charts" / "fieldkube" / "files"
PANEL_WIDTH = 12  # of Grafana's 24 columns: two panels per row
PANEL_HEIGHT = 8


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""
    kind: str = "timeseries"  # or "stat" (the latest value, big) or "table" (one row per series, instant)


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    variables: tuple[tuple[str, str], ...] = field(default=())  # (name, label_values query)


def q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


def quantiles(metric: str, by: str, window: str = "5m") -> tuple[Query, ...]:
    """p50/p95/p99 of a histogram, aggregated `by` one label."""
    return tuple(
        q(
            f"histogram_quantile({p}, sum by (le, {by}) (rate({metric}_bucket[{window}])))",
            f"p{round(p * 100)} {{{{{by}}}}}",
        )
        for p in (0.5, 0.95, 0.99)
    )


def median(metric: str) -> str:
    """Median over 30 minutes of a per-image histogram: slow enough to show drift, not noise."""
    return f"histogram_quantile(0.5, sum by (le) (rate({metric}_bucket[30m])))"


TRAINING = Dashboard(
    uid="fieldkube-training",
    title="fieldkube / Training",
    description="Throughput, step time, data-loader wait, allreduce and loss of every training rank.",
    variables=(("trainingjob", "label_values(fieldkube_train_loss, trainingjob)"),),
    panels=(
        Panel(
            "Images/s (all ranks)",
            "short",
            (
                q(
                    'sum by (trainingjob) (fieldkube_train_images_per_second{trainingjob=~"$trainingjob"})',
                    "{{trainingjob}}",
                ),
            ),
        ),
        Panel(
            "Images/s per rank",
            "short",
            (
                q(
                    'fieldkube_train_images_per_second{trainingjob=~"$trainingjob"}',
                    "{{trainingjob}} rank {{rank}}",
                ),
            ),
            "A rank far below the others is a straggler: every step waits for it at the allreduce.",
        ),
        Panel(
            "MFU",
            "percentunit",
            (
                q(
                    'avg by (trainingjob) (fieldkube_train_mfu{trainingjob=~"$trainingjob"})',
                    "{{trainingjob}}",
                ),
            ),
            "Model FLOPs utilisation: achieved training FLOP/s over the GPUs' dense bf16 peak, loader waits "
            "included. Small convolutions (counter-mcnn) stay in single digits; a U-Net reaches tens of %. "
            "No data on CPUs (no peak) unless runtime.peak_tflops is set.",
        ),
        Panel("Step duration", "s", quantiles("fieldkube_train_step_duration_seconds", "trainingjob")),
        Panel(
            "Data-loader wait share",
            "percentunit",
            (
                q(
                    "sum by (trainingjob) (rate(fieldkube_train_loader_wait_seconds_sum[5m]))"
                    " / sum by (trainingjob) (rate(fieldkube_train_step_duration_seconds_sum[5m]))",
                    "{{trainingjob}}",
                ),
            ),
            "Share of step time spent waiting for the next batch; above ~10% the loader starves the model.",
        ),
        Panel(
            "Allreduce share",
            "percentunit",
            (
                q(
                    "sum by (trainingjob) (rate(fieldkube_train_allreduce_seconds_sum[5m]))"
                    " / sum by (trainingjob) (rate(fieldkube_train_step_duration_seconds_sum[5m]))",
                    "{{trainingjob}}",
                ),
            ),
        ),
        Panel(
            "Loss",
            "short",
            (q('fieldkube_train_loss{trainingjob=~"$trainingjob"}', "{{trainingjob}} rank {{rank}}"),),
        ),
        Panel(
            "Epoch",
            "short",
            (
                q(
                    'max by (trainingjob) (fieldkube_train_epoch{trainingjob=~"$trainingjob"})',
                    "{{trainingjob}}",
                ),
            ),
            kind="stat",
        ),
        Panel(
            "Samples/s (counter rate)",
            "short",
            (q("sum by (trainingjob) (rate(fieldkube_train_samples_total[5m]))", "{{trainingjob}}"),),
        ),
    ),
)

GPU = Dashboard(
    uid="fieldkube-gpu",
    title="fieldkube / GPUs",
    description="Per-GPU utilisation, memory and power, in the DCGM exporter's names (trainer and serving).",
    panels=(
        Panel("GPU utilisation", "percent", (q("DCGM_FI_DEV_GPU_UTIL", "{{pod}} gpu {{gpu}}"),)),
        Panel(
            "Mean GPU utilisation by pod", "percent", (q("avg by (pod) (DCGM_FI_DEV_GPU_UTIL)", "{{pod}}"),)
        ),
        Panel("Framebuffer used", "decmbytes", (q("DCGM_FI_DEV_FB_USED", "{{pod}} gpu {{gpu}}"),)),
        Panel("Power", "watt", (q("DCGM_FI_DEV_POWER_USAGE", "{{pod}} gpu {{gpu}}"),)),
    ),
)

SERVING = Dashboard(
    uid="fieldkube-serving",
    title="fieldkube / Serving",
    description="Inference service traffic, latency, batching, load shedding, model versions and drift.",
    panels=(
        Panel(
            "Requests/s by endpoint and status",
            "reqps",
            (
                q(
                    "sum by (endpoint, status) (rate(fieldkube_serve_request_duration_seconds_count[5m]))",
                    "{{endpoint}} {{status}}",
                ),
            ),
        ),
        Panel("Latency", "s", quantiles("fieldkube_serve_request_duration_seconds", "endpoint")),
        Panel("Requests in flight", "short", (q("sum(fieldkube_serve_requests_in_flight)", "in flight"),)),
        Panel("Queue wait", "s", quantiles("fieldkube_serve_queue_wait_seconds", "task")),
        Panel(
            "Mean batch size",
            "short",
            (
                q(
                    "sum by (task) (rate(fieldkube_serve_batch_size_sum[5m]))"
                    " / sum by (task) (rate(fieldkube_serve_batch_size_count[5m]))",
                    "{{task}}",
                ),
            ),
        ),
        Panel(
            "Rejected requests/s",
            "reqps",
            (
                q(
                    "sum by (task, reason) (rate(fieldkube_serve_rejected_requests_total[5m]))",
                    "{{task}} {{reason}}",
                ),
            ),
            "429 when the queue is full, 503 on timeout: sustained values mean the service needs replicas.",
        ),
        Panel(
            "Predicted flowers per image (drift)",
            "short",
            (q(median("fieldkube_serve_predicted_count"), "median"),),
        ),
        Panel(
            "Building fraction per image (drift)",
            "percentunit",
            (q(median("fieldkube_serve_mask_fraction"), "median"),),
        ),
        Panel(
            "Model serving each task",
            "short",
            (
                q(
                    "max by (task, name, version) (fieldkube_serve_model_info)",
                    "{{task}} {{name}} v{{version}}",
                ),
            ),
            kind="table",
        ),
        Panel(
            "Model reloads",
            "short",
            (
                q(
                    "sum by (task, outcome) (increase(fieldkube_serve_model_reloads_total[1h]))",
                    "{{task}} {{outcome}}",
                ),
            ),
        ),
    ),
)

OPERATOR = Dashboard(
    uid="fieldkube-operator",
    title="fieldkube / TrainingJobs",
    description="TrainingJobs by phase, reconcile rate and latency, time to Running, GPU-hours, failures.",
    panels=(
        Panel("TrainingJobs by phase", "short", (q("sum by (phase) (fieldkube_trainingjobs)", "{{phase}}"),)),
        Panel(
            "Reconciles/s and errors/s",
            "ops",
            (
                q("sum by (handler) (rate(fieldkube_operator_reconcile_total[5m]))", "{{handler}}"),
                q(
                    "sum by (handler) (rate(fieldkube_operator_reconcile_errors_total[5m]))",
                    "{{handler}} errors",
                ),
            ),
        ),
        Panel(
            "Reconcile duration", "s", quantiles("fieldkube_operator_reconcile_duration_seconds", "handler")
        ),
        Panel(
            "Time from creation to Running (p95)",
            "s",
            (
                q(
                    "histogram_quantile(0.95, sum by (le)"
                    " (rate(fieldkube_trainingjob_time_to_running_seconds_bucket[1h])))",
                    "p95",
                ),
            ),
            "Long waits mean jobs queue for GPUs: see the Unschedulable reason in `kubectl get tj`.",
        ),
        Panel(
            "GPU-hours by namespace (last 24 h)",
            "short",
            (
                q(
                    "sum by (namespace) (increase(fieldkube_trainingjob_gpu_seconds_total[24h])) / 3600",
                    "{{namespace}}",
                ),
            ),
            kind="stat",
        ),
        Panel(
            "Failures by reason (last 24 h)",
            "short",
            (q("sum by (reason) (increase(fieldkube_trainingjob_failures_total[24h]))", "{{reason}}"),),
        ),
    ),
)

DASHBOARDS = (TRAINING, GPU, SERVING, OPERATOR)

# Alerting rules: few, each actionable. `for` keeps a blip from paging anyone.
ALERTS = (
    {
        "alert": "FieldkubeTrainingLoaderStarved",
        "expr": "sum by (trainingjob) (rate(fieldkube_train_loader_wait_seconds_sum[10m]))"
        " / sum by (trainingjob) (rate(fieldkube_train_step_duration_seconds_sum[10m])) > 0.25",
        "for": "15m",
        "labels": {"severity": "warning"},
        "annotations": {"summary": "{{ $labels.trainingjob }} waits for data more than 25% of each step"},
    },
    {
        "alert": "FieldkubeServingLatencyHigh",
        "expr": "histogram_quantile(0.95, sum by (le, endpoint)"
        " (rate(fieldkube_serve_request_duration_seconds_bucket[5m]))) > 5",
        "for": "10m",
        "labels": {"severity": "warning"},
        "annotations": {"summary": "p95 latency of {{ $labels.endpoint }} above 5 s"},
    },
    {
        "alert": "FieldkubeServingShedding",
        "expr": "sum by (task) (rate(fieldkube_serve_rejected_requests_total[5m])) > 0.1",
        "for": "10m",
        "labels": {"severity": "warning"},
        "annotations": {"summary": "the {{ $labels.task }} model refuses requests for load: add replicas"},
    },
    {
        "alert": "FieldkubeModelReloadRejected",
        "expr": 'increase(fieldkube_serve_model_reloads_total{outcome="rejected"}[15m]) > 0',
        "labels": {"severity": "warning"},
        "annotations": {"summary": "a new {{ $labels.task }} model version was rejected; the old one serves"},
    },
    {
        "alert": "FieldkubeTrainingJobsFailing",
        "expr": "sum by (reason) (increase(fieldkube_trainingjob_failures_total[1h])) > 3",
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": "more than 3 TrainingJobs failed in an hour with reason {{ $labels.reason }}"
        },
    },
    {
        "alert": "FieldkubeGpuIdleDuringTraining",
        "expr": 'avg by (pod) (DCGM_FI_DEV_GPU_UTIL{pod=~".*-worker-.*"}) < 20',
        "for": "30m",
        "labels": {"severity": "info"},
        "annotations": {"summary": "{{ $labels.pod }} holds GPUs that are mostly idle"},
    },
)


DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
LEGEND = (
    VizLegendOptions()
    .display_mode(LegendDisplayMode.LIST)
    .placement(LegendPlacement.BOTTOM)
    .show_legend(True)
)
PANEL_BUILDERS: dict[str, type[timeseries.Panel] | type[stat.Panel] | type[table.Panel]] = {
    "timeseries": timeseries.Panel,
    "stat": stat.Panel,
    "table": table.Panel,
}


def target(query: Query, ref_id: str, kind: str) -> prometheus.Dataquery:
    """One PromQL target: an instant query for a table (one row per series), else a range query (a stat
    shows its last value, so a finished job's last epoch stays visible)."""
    built = prometheus.Dataquery().ref_id(ref_id).expr(query.expr).legend_format(query.legend)
    if kind == "table":
        return built.instant().format(PromQueryFormat.TABLE)
    return built.range()


def panel_builder(panel: Panel, panel_id: int) -> cogbuilder.Builder[GrafanaPanel]:
    """A half-width panel; the dashboard builder places it on the grid (two per row)."""
    built = (
        PANEL_BUILDERS[panel.kind]()
        .id(panel_id)
        .title(panel.title)
        .datasource(DATASOURCE)
        .unit(panel.unit)
        .height(PANEL_HEIGHT)
        .span(PANEL_WIDTH)
        .targets([target(query, chr(ord("A") + n), panel.kind) for n, query in enumerate(panel.queries)])
    )
    if panel.description:
        built = built.description(panel.description)
    if isinstance(built, timeseries.Panel):
        built = built.legend(LEGEND)
    return built


def dashboard_builder(board: Dashboard) -> DashboardBuilder:
    """The dashboard with a datasource variable, its query variables and its panels in order."""
    built = (
        DashboardBuilder(board.title)
        .uid(board.uid)
        .description(board.description)
        .tags(["fieldkube"])
        .editable()
        .refresh("30s")
        .time("now-6h", "now")
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    for name, query in board.variables:
        built = built.with_variable(
            QueryVariable(name)
            .datasource(DATASOURCE)
            .query(query)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        )
    for index, panel in enumerate(board.panels):
        built = built.with_panel(panel_builder(panel, index + 1))
    return built


def grafana_json(board: Dashboard) -> dict[str, object]:
    """Grafana's dashboard model as the SDK encodes it (plain JSON types, keys as Grafana names them)."""
    encoded: dict[str, object] = json.loads(json.dumps(dashboard_builder(board).build(), cls=JSONEncoder))
    return encoded


def rules_yaml() -> dict[str, object]:
    return {"groups": [{"name": "fieldkube", "rules": list(ALERTS)}]}


def render() -> dict[Path, str]:
    """Every generated file and its content."""
    files = {
        OUT / "dashboards" / f"{board.uid}.json": json.dumps(grafana_json(board), indent=2) + "\n"
        for board in DASHBOARDS
    }
    header = "# Generated by hack/dashboards.py: edit that file, then run `python hack/dashboards.py`.\n"
    files[OUT / "prometheus-rules.yaml"] = header + yaml.safe_dump(rules_yaml(), sort_keys=False, width=200)
    return files


def all_queries() -> list[str]:
    """Every PromQL expression in the dashboards and rules (for the tests)."""
    exprs = [query.expr for board in DASHBOARDS for panel in board.panels for query in panel.queries]
    return exprs + [str(rule["expr"]) for rule in ALERTS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if the committed files are out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in render().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        print(f"wrote {path}")
    if stale:
        print("out of date (run `python hack/dashboards.py`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
