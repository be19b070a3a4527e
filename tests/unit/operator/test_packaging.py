"""The image's CMD and the plain manifests start the operator with flags its CLI accepts (the chart's own
renderings are checked in tests/integration/chart/)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import yaml

from fieldkube.operator.cli import _parser, credentials_env_names, main

ROOT = Path(__file__).resolve().parents[3]


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


def test_the_credentials_variables_must_be_environment_variable_names() -> None:
    assert credentials_env_names(" MLFLOW_TRACKING_USERNAME, AWS_ACCESS_KEY_ID,") == (
        "MLFLOW_TRACKING_USERNAME",
        "AWS_ACCESS_KEY_ID",
    )
    assert credentials_env_names("MLFLOW_TRACKING_USERNAME,not-a-name") is None


def test_a_bad_credentials_variable_name_is_one_line_naming_the_flag() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--mlflow-credentials-secret", "creds", "--mlflow-credentials-env", "A,b-c"])
    assert "--mlflow-credentials-env" in str(exited.value) and "'A,b-c'" in str(exited.value)
