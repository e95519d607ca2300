"""docker-compose.yml, provisioning YAML, Dockerfile and .env.example: parse, agree, reference real files."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from datasource.config import Settings

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_ENV = {f"CPA_MONITOR_{f.name.upper()}" for f in fields(Settings)}
ENV_REF = re.compile(r"\$\{?([A-Z_][A-Z0-9_]*)")


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """container path -> host source (bind mounts and named volumes)."""
    out = {}
    for spec in svc.get("volumes", []):
        source, target = spec.split(":")[:2]
        out[target] = source
    return out


def host_path(svc: dict[str, Any], container_path: str) -> Path:
    for target, source in sorted(mounts(svc).items(), key=lambda kv: -len(kv[0])):
        if container_path.startswith(target + "/") and source.startswith("./"):
            return ROOT / source[2:] / container_path[len(target) + 1:]
    raise AssertionError(f"{container_path} is not under a bind mount")


def test_grafana_is_pinned_with_the_plugin_preinstalled_and_pinned():
    grafana = service("grafana")
    image, _, tag = grafana["image"].partition(":")
    assert image == "grafana/grafana"
    version = tuple(int(p) for p in tag.split("."))
    assert len(version) == 3 and version >= (11, 5, 0)  # preinstall with id@version needs 11.5+
    assert re.fullmatch(r"simpod-json-datasource@\d+\.\d+\.\d+", grafana["environment"]["GF_PLUGINS_PREINSTALL_SYNC"])
    assert "GF_INSTALL_PLUGINS" not in grafana["environment"]


def test_grafana_mounts_provisioning_and_dashboards_and_sets_the_home_dashboard():
    grafana = service("grafana")
    assert mounts(grafana)["/etc/grafana/provisioning"] == "./provisioning"
    home = host_path(grafana, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home == ROOT / "dashboards" / "cpa-monitoring.json" and home.exists()
    provider = yaml.safe_load((ROOT / "provisioning/dashboards/cpa-monitor.yaml").read_text())["providers"][0]
    assert (provider["type"], provider["folder"]) == ("file", "CPA Monitor")
    dash_dir = host_path(grafana, provider["options"]["path"] + "/x").parent
    assert dash_dir == ROOT / "dashboards"
    assert len(list(dash_dir.glob("*.json"))) == 4
    assert (ROOT / "provisioning/datasources").is_dir()


def test_datasource_provisioning_matches_the_dashboards_and_the_grafana_environment():
    doc = yaml.safe_load((ROOT / "provisioning/datasources/cpa-monitor.yaml").read_text())
    ds = doc["datasources"][0]
    assert (ds["type"], ds["uid"], ds["access"]) == ("simpod-json-datasource", "cpa-monitor", "proxy")
    assert ds["jsonData"]["httpHeaderName1"] == "Authorization"
    assert ds["secureJsonData"]["httpHeaderValue1"] == "Bearer $CPA_MONITOR_API_TOKEN"
    env = service("grafana")["environment"]
    for name in ENV_REF.findall(ds["url"] + " " + ds["secureJsonData"]["httpHeaderValue1"]):
        assert name in env, name
    assert env["CPA_MONITOR_DATASOURCE_URL"].endswith("http://cpa-monitor:8080}")
    for path in (ROOT / "dashboards").glob("*.json"):
        assert '"uid": "cpa-monitor"' in path.read_text()


def test_service_runs_serve_on_all_interfaces_with_token_and_a_named_volume():
    svc = service("cpa-monitor")
    assert svc["build"] == "." and (ROOT / "Dockerfile").exists()
    assert svc["command"] == ["serve"]
    env = svc["environment"]
    assert env["CPA_MONITOR_BIND"] == "0.0.0.0:8080"
    assert env["CPA_MONITOR_API_TOKEN"].startswith("${CPA_MONITOR_API_TOKEN:?")
    assert env["CPA_MONITOR_CPA_URL"] == "${CPA_MONITOR_CPA_URL:-}"
    assert env["CPA_MONITOR_CPA_MANAGEMENT_KEY"] == "${CPA_MONITOR_CPA_MANAGEMENT_KEY:-}"
    db_dir = str(Path(env["CPA_MONITOR_DB"]).parent)
    assert mounts(svc)[db_dir] in compose()["volumes"]
    assert set(env) <= SETTINGS_ENV, set(env) - SETTINGS_ENV


def test_demo_profile_runs_the_demo_command():
    demo = service("cpa-monitor-demo")
    assert demo["profiles"] == ["demo"] and demo["command"] == ["demo"]
    assert demo["environment"]["CPA_MONITOR_BIND"] == "0.0.0.0:8080"
    assert mounts(demo)["/data"] in compose()["volumes"]
    assert set(demo["environment"]) <= SETTINGS_ENV
    assert "profiles" not in service("cpa-monitor") and "profiles" not in service("grafana")


def test_compose_commands_are_cli_commands():
    from datasource.cli import cli

    for name in ("cpa-monitor", "cpa-monitor-demo"):
        command = service(name)["command"][0]
        assert command in cli.list_commands(None) and cli.get_command(None, command) is not None, name


def test_every_service_has_a_healthcheck_and_grafana_waits_for_the_api():
    for name, svc in compose()["services"].items():
        check = svc["healthcheck"]["test"]
        assert check[0] == "CMD" and len(check) > 2, name
    assert "/healthz" in " ".join(service("cpa-monitor")["healthcheck"]["test"])
    assert service("grafana")["depends_on"]["cpa-monitor"]["condition"] == "service_healthy"


def test_env_example_lists_every_variable_compose_and_provisioning_read():
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(ENV_REF.findall(text)) - {"GF_PATHS_PROVISIONING"}
    optional = {"CPA_MONITOR_LOG_LEVEL", "CPA_MONITOR_DEMO_RATE", "CPA_MONITOR_PORT"}
    assert used - optional <= set(example), (used - optional) - set(example)
    assert example["CPA_MONITOR_DATASOURCE_URL"] == "http://cpa-monitor:8080"


def _readme_install() -> str:
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"pip install (?:-e )?('?\.(?:\[[a-z,]+\])?'?)", readme)
    assert m, "README has no pip install line"
    return m.group(1).strip("'")


def test_dockerfile_installs_the_package_the_readme_installs_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    installs = [shlex.split(m) for m in re.findall(r"pip install ([^\\\n&]+)", text)]
    assert [args[-1] for args in installs] == [_readme_install()]
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    assert entry == ["cpa-monitor"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("pyproject.toml", "README.md", "datasource"):
        assert needed not in ignored and (ROOT / needed).exists()
        assert re.search(rf"^COPY .*{re.escape(needed)}", text, re.M)
