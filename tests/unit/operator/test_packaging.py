"""The image's CMD, the plain manifests and the Helm chart start the operator with flags its CLI accepts."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import yaml

from fieldkube.operator.cli import _parser

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts/fieldkube-operator"


def test_the_console_script_is_the_cli_main() -> None:
    project = tomllib.loads((ROOT / "operator/pyproject.toml").read_text())["project"]
    assert project["scripts"]["fieldkube-operator"] == "fieldkube.operator.cli:main"


def test_the_image_cmd_runs_the_operator() -> None:
    cmd = next(
        line
        for line in (ROOT / "images/operator/Dockerfile").read_text().splitlines()
        if line.startswith("CMD")
    )
    argv = json.loads(cmd.removeprefix("CMD").strip())
    assert argv[0] == "fieldkube-operator"
    args = _parser().parse_args(argv[1:])
    assert args.command == "run" and args.bind_address == "0.0.0.0" and not args.standalone


def test_the_manifest_deployment_args_parse_and_its_probes_use_the_health_port() -> None:
    deployment = yaml.safe_load((ROOT / "manifests/operator/deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    argv = container["args"]
    assert argv[0] == "fieldkube-operator"
    args = _parser().parse_args(argv[1:])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": args.metrics_port, "health": args.health_port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_the_chart_args_parse_with_the_default_values() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    template = (CHART / "templates/deployment.yaml").read_text()
    block = template.split("args:", 1)[1].split("env:", 1)[0]
    argv = []
    for line in block.splitlines():
        item = line.strip()
        if not item.startswith("- "):
            continue  # template control lines ({{- range }} / {{- end }})
        rendered = re.sub(
            r"\{\{\s*\.Values\.(\w+)\s*\}\}", lambda m: str(values[m.group(1)]), item.removeprefix("- ")
        )
        argv.append(rendered.replace("{{ . }}", "team-a"))
    assert argv[0] == "fieldkube-operator"
    args = _parser().parse_args(argv[1:])
    assert (args.metrics_port, args.health_port) == (values["metricsPort"], values["healthPort"])
    assert args.namespace == ["team-a"]  # one --namespace per watched namespace (the range line)
