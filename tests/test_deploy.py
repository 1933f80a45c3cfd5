"""The deployment kit (deploy/, Dockerfile, .dockerignore, docs/deploy.md) holds
together with the gateway it deploys: every file parses, every configuration loads,
every probe reaches a real path, every metric the alerts and the dashboard name
exists (a renamed metric breaks this test, not an operator's pager), and the
numbers that must agree (shutdown grace, mounts, secrets) do.

promtool, where installed (Debian: apt-get install prometheus), checks and unit
tests the alert rules; CI installs it and sets GATEWAY_REQUIRE_PROMTOOL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.config import Config, parse_config
from gateway.metrics import COUNTERS, GAUGES, HISTOGRAMS, SPOOL_BYTES
from gateway.runtime import SHUTDOWN_GRACE
from gateway.storage import functions, migrations
from tests.harness import running_gateway

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "gateway-dashboard.json"

# The secrets a deployment's environment carries (every *_env a config names).
SECRETS = {
    "DIFY_API_KEY": "app-test",
    "GATEWAY_ADMIN_TOKEN": "admin-token-0123456789",
    "GATEWAY_METRICS_TOKEN": "metrics-token-0123456789",
}
# Seconds after server.shutdown_grace that shutdown may still take: up to
# SHUTDOWN_GRACE for the cut answers to record what they read, then up to as long
# for records under way (Gateway.stop; docs/proxy.md, "Shutting down").
RECORD_WAIT = 2 * SHUTDOWN_GRACE

REQUIRE_PROMTOOL = os.environ.get("GATEWAY_REQUIRE_PROMTOOL", "") not in ("", "0", "false")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(DEPLOY / "compose.yaml")
    return data


def manifests() -> dict[str, dict[str, Any]]:
    """The Kubernetes objects kustomization.yaml applies, by kind."""
    kustomization = load_yaml(KUBERNETES / "kustomization.yaml")
    out: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((KUBERNETES / name).read_text()):
            assert doc["kind"] not in out, f"{name}: a second {doc['kind']}"
            out[doc["kind"]] = doc
    return out


def container(kind_docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (only,) = kind_docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = only
    return result


def configmap_toml() -> dict[str, Any]:
    return tomllib.loads(manifests()["ConfigMap"]["data"]["gateway.toml"])


def duration(text: str) -> float:
    """A compose duration ("45s", "1m30s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    assert parts and text, text
    return sum(int(v) * units[u] for v, u in zip(parts.groups(), "hms", strict=True) if v)


# --- configuration ---------------------------------------------------------------------


def load(data: dict[str, Any]) -> Config:
    return parse_config(data, env={**SECRETS, "GATEWAY_DATABASE_URL": "postgresql://x@db/gw"})


def test_the_compose_configuration_loads() -> None:
    config = load(tomllib.loads((DEPLOY / "gateway.toml").read_text()))
    assert config.server.host == "0.0.0.0"  # reachable from outside its container
    assert config.database.url.startswith("postgresql://")
    assert config.upstream.api_key == SECRETS["DIFY_API_KEY"]
    assert config.metrics.token == SECRETS["GATEWAY_METRICS_TOKEN"]
    assert not config.metrics.public


def test_the_configmap_configuration_loads() -> None:
    config = load(configmap_toml())
    assert config.server.host == "0.0.0.0"
    assert config.upstream.api_key == SECRETS["DIFY_API_KEY"]
    assert config.metrics.token == SECRETS["GATEWAY_METRICS_TOKEN"]
    assert not config.metrics.public


def secrets_named(config: Config) -> set[str]:
    return {config.upstream.api_key_env, config.admin.token_env, config.metrics.token_env}


def test_every_secret_the_configurations_read_has_a_place() -> None:
    """A secret the configuration names is in .env.example (compose) and in the
    Secret template (Kubernetes), with the database URL of each."""
    example = (DEPLOY / ".env.example").read_text()
    env_keys = set(re.findall(r"^([A-Z_]+)=", example, re.MULTILINE))
    compose_config = load(tomllib.loads((DEPLOY / "gateway.toml").read_text()))
    assert secrets_named(compose_config) <= env_keys
    assert "POSTGRES_PASSWORD" in env_keys
    # Only names, no values, in the committed example.
    assert re.findall(r"^[A-Z_]+=(.+)$", example, re.MULTILINE) == []

    secret = load_yaml(KUBERNETES / "secret.example.yaml")
    assert secret["kind"] == "Secret"
    keys = set(secret["stringData"])
    assert secrets_named(load(configmap_toml())) | {"GATEWAY_DATABASE_URL"} <= keys
    assert all("CHANGE-ME" in value for value in secret["stringData"].values())
    # The template is not applied by kustomize (it would overwrite the real one).
    assert "secret.example.yaml" not in load_yaml(KUBERNETES / "kustomization.yaml")["resources"]


def test_the_env_file_is_not_committed() -> None:
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()
    tracked = subprocess.run(
        ["git", "ls-files", "deploy/.env"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert tracked.stdout == ""


# --- compose ------------------------------------------------------------------------------


def test_compose_runs_replicas_of_the_repository_image_with_postgres() -> None:
    data = compose()
    gateway, postgres = data["services"]["gateway"], data["services"]["postgres"]
    assert gateway["deploy"]["replicas"] == 2
    assert gateway["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    assert (DEPLOY / gateway["build"]["context"] / gateway["build"]["dockerfile"]).is_file()
    assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert gateway["env_file"] == ".env"

    # The database on a named volume; the configuration read-only; the spool on a
    # volume, where the configuration puts the spool file.
    named = set(data["volumes"])
    mounts = {m.split(":")[1]: m for m in postgres["volumes"] + gateway["volumes"]}
    assert mounts["/var/lib/postgresql/data"].split(":")[0] in named
    assert mounts["/etc/gateway/gateway.toml"] == "./gateway.toml:/etc/gateway/gateway.toml:ro"
    config = load(tomllib.loads((DEPLOY / "gateway.toml").read_text()))
    spool_dir = str(Path(config.database.spool_file).parent)
    assert mounts[spool_dir].split(":")[0] in named

    # The database URL points at the postgres service, with its password.
    url = gateway["environment"]["GATEWAY_DATABASE_URL"]
    assert url == "postgresql://gateway:${POSTGRES_PASSWORD}@postgres:5432/gateway"


def test_compose_waits_for_the_shutdown_grace() -> None:
    """docker sends SIGKILL after stop_grace_period: not before the gateway's
    grace and the wait for the records after it."""
    config = load(tomllib.loads((DEPLOY / "gateway.toml").read_text()))
    stop = duration(compose()["services"]["gateway"]["stop_grace_period"])
    assert stop > config.server.shutdown_grace + RECORD_WAIT


def test_compose_monitoring_mounts_the_kit() -> None:
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for mount in services[name]["volumes"]:
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), mount
    # The scrape configuration reads the token from where compose puts the secret.
    scrape = load_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"][0]
    (secret,) = services["prometheus"]["secrets"]
    assert scrape["authorization"]["credentials_file"] == f"/run/secrets/{secret['target']}"
    assert compose()["secrets"][secret["source"]] == {"environment": "GATEWAY_METRICS_TOKEN"}


# --- Kubernetes -----------------------------------------------------------------------------


def test_the_kubernetes_manifests_fit_together() -> None:
    docs = manifests()
    assert set(docs) == {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    }
    deployment = docs["Deployment"]
    spec = deployment["spec"]
    pod = spec["template"]
    labels = pod["metadata"]["labels"]
    assert spec["replicas"] >= 2
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["minAvailable"] < spec["replicas"]

    c = container(docs)
    requests = c["resources"]["requests"]
    assert requests["cpu"] and requests["memory"]
    # The Service's port reaches the container's.
    (port,) = c["ports"]
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]

    # The ConfigMap is mounted (as a directory, so edits reach the pod) where
    # GATEWAY_CONFIG points, and the secrets come from the template's Secret.
    env = {e["name"]: e["value"] for e in c["env"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    config_mount = mounts[str(Path(env["GATEWAY_CONFIG"]).parent)]
    assert config_mount["readOnly"] is True and "subPath" not in config_mount
    assert (
        volumes[config_mount["name"]]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    )
    assert Path(env["GATEWAY_CONFIG"]).name in docs["ConfigMap"]["data"]
    secret = load_yaml(KUBERNETES / "secret.example.yaml")
    assert c["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]

    # The spool file lies on a writable volume of its own.
    spool = load(configmap_toml()).database.spool_file
    assert mounts[str(Path(spool).parent)].get("readOnly") is not True

    # Runs as the image's user (the Dockerfile's uid).
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = pod["spec"]["securityContext"]["runAsUser"]
    assert f"--uid {uid} " in dockerfile


def test_kustomize_renders_the_manifests_into_the_namespace() -> None:
    """`kubectl apply -k deploy/kubernetes/` as kubectl renders it (where installed)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    rendered = list(yaml.safe_load_all(result.stdout))
    assert sorted(d["kind"] for d in rendered) == sorted(manifests())
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "gateway", doc["kind"]


def test_kubernetes_waits_for_the_shutdown_grace() -> None:
    """The kubelet sends SIGKILL terminationGracePeriodSeconds after the preStop
    hook starts: it must cover the hook, the gateway's grace and the records."""
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    config = load(configmap_toml())
    command = container(manifests())["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pod["terminationGracePeriodSeconds"] > (
        pre_stop + config.server.shutdown_grace + RECORD_WAIT
    )


def probe_paths() -> dict[str, str]:
    """Every health check in the kit: where it is, and the path it asks."""
    paths: dict[str, str] = {}
    c = container(manifests())
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        paths[f"kubernetes {probe}"] = c[probe]["httpGet"]["path"]
    test = " ".join(compose()["services"]["gateway"]["healthcheck"]["test"])
    (paths["compose healthcheck"],) = re.findall(r"127\.0\.0\.1:8000(/\w+)", test)
    healthcheck = re.search(r"^HEALTHCHECK .*$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert healthcheck is not None
    (paths["Dockerfile HEALTHCHECK"],) = re.findall(r"127\.0\.0\.1:8000(/\w+)", healthcheck[0])
    return paths


def test_liveness_is_healthz_and_readiness_is_readyz() -> None:
    paths = probe_paths()
    assert paths["kubernetes livenessProbe"] == "/healthz"
    assert paths["kubernetes startupProbe"] == "/healthz"
    assert paths["kubernetes readinessProbe"] == "/readyz"
    assert paths["compose healthcheck"] == "/readyz"
    assert paths["Dockerfile HEALTHCHECK"] == "/healthz"


async def test_every_probe_reaches_a_real_gateway_path(sqlite_url: str) -> None:
    """Asked of a running gateway, each probe's path answers 200 without a token."""
    async with running_gateway(sqlite_url) as h, httpx.AsyncClient(base_url=h.url) as client:
        for where, path in probe_paths().items():
            response = await client.get(path)
            assert response.status_code == 200, (where, path, response.text)


# --- metrics: the alert rules and the dashboard ---------------------------------------

DECLARED = {*COUNTERS, *GAUGES, SPOOL_BYTES} | {
    f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
}
# Prometheus' own series the kit may use.
PROMETHEUS_SERIES = {"up"}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bgateway_[a-z0-9_]+", expr))


def rules() -> list[dict[str, Any]]:
    data = load_yaml(PROMETHEUS / "alerts.yml")
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v.get("type") == "query"]
    return exprs


def test_the_alert_rules_page_on_what_an_operator_must_know() -> None:
    by_name = {rule["alert"]: rule for rule in rules()}
    assert all(
        rule["expr"] and rule["labels"]["severity"] in ("page", "ticket") for rule in rules()
    )
    # Upstream errors, storage failures, spool growth, admission latency, alert delivery,
    # a clock apart from the database's.
    wanted = {
        "GatewayUpstreamErrors": "gateway_upstream_errors_total",
        "GatewayStorageErrors": "gateway_storage_errors_total",
        "GatewayUsageSpooled": "gateway_settle_spooled_total",
        "GatewayUsageRejected": "gateway_settle_rejected_total",
        "GatewayUsageLost": "gateway_settle_lost_total",
        "GatewaySpoolNotEmpty": "gateway_spool_bytes",
        "GatewayAdmissionSlow": "gateway_admission_seconds_bucket",
        "GatewayAlertDeliveryFailing": "gateway_alert_deliveries_total",
        "GatewayClockOffset": "gateway_clock_offset_seconds",
    }
    for alert, metric in wanted.items():
        assert metric in metric_names(by_name[alert]["expr"]), alert


def test_every_metric_the_rules_and_the_dashboard_name_exists() -> None:
    """A renamed or removed metric in gateway/metrics.py fails here."""
    docs = (ROOT / "docs" / "metrics.md").read_text()
    exprs = [rule["expr"] for rule in rules()] + dashboard_exprs()
    tests = load_yaml(PROMETHEUS / "alerts.test.yml")
    exprs += [s["series"] for t in tests["tests"] for s in t["input_series"]]
    named = set().union(*(metric_names(e) for e in exprs))
    assert named, "no metric found: the pattern is wrong"
    assert named <= DECLARED, sorted(named - DECLARED)
    for name in named:
        histogram = re.sub(r"_(bucket|sum|count)$", "", name)
        base = histogram if histogram in HISTOGRAMS else name
        assert f"`{base}`" in docs, f"{base} is not described in docs/metrics.md"
    # Anything else that looks like a series is one of Prometheus' own.
    for expr in exprs:
        bare = re.findall(r"(?<![\w.$])([a-z_]+)\{", expr)
        assert set(bare) - named <= PROMETHEUS_SERIES, expr


def test_the_dashboard_is_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
    # Every alert's metric has a panel.
    shown = set().union(*(metric_names(e) for e in dashboard_exprs()))
    for rule in rules():
        assert metric_names(rule["expr"]) <= shown, rule["alert"]


def test_the_scrape_configurations_send_the_metrics_token() -> None:
    for name in ("prometheus.yml", "kubernetes-scrape.yml"):
        (job,) = load_yaml(PROMETHEUS / name)["scrape_configs"]
        assert job["authorization"]["type"] == "Bearer"
        assert job["authorization"]["credentials_file"].startswith("/")


# --- promtool ---------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if REQUIRE_PROMTOOL:
            pytest.fail("promtool is not installed (GATEWAY_REQUIRE_PROMTOOL is set)")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def run(*args: str | Path, cwd: Path = PROMETHEUS) -> None:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_rules() -> None:
    run(promtool(), "check", "rules", "alerts.yml")


def test_promtool_unit_tests_the_rules() -> None:
    """Each alert fires on the series it is for, and none on a healthy gateway."""
    run(promtool(), "test", "rules", "alerts.test.yml")


def test_promtool_checks_the_compose_prometheus_configuration(tmp_path: Path) -> None:
    """The scrape configuration, with its token file where compose mounts it."""
    tool = promtool()
    token = tmp_path / "token"
    token.write_text("x")
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    config["scrape_configs"][0]["authorization"]["credentials_file"] = str(token)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path / "alerts.yml")
    run(tool, "check", "config", "prometheus.yml", cwd=tmp_path)


# --- the image ---------------------------------------------------------------------------


def test_dockerignore_lets_in_only_what_the_dockerfile_copies() -> None:
    """The context leaves out .venv, .git, databases, caches, deploy/.env: all of it
    but the files the Dockerfile copies."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied: set[str] = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            *sources, _target = line.split()[1:]
            copied |= {s.rstrip("/") for s in sources if not s.startswith("--")}
    assert allowed == copied
    for cache in ("**/__pycache__", "**/*.db"):
        assert cache in lines


def test_the_deploy_guide_is_linked_from_the_readme() -> None:
    assert "(docs/deploy.md)" in (ROOT / "README.md").read_text()
    guide = (ROOT / "docs" / "deploy.md").read_text()
    for path in ("deploy/compose.yaml", "deploy/kubernetes/", "/readyz", "/healthz"):
        assert path in guide


# The PostgreSQL function set (gateway/storage/sql/postgres/functions/, its hash
# as `functions` computes it) each migration number shipped with: a release
# that changes a function adds a migration and a line here, and never edits a
# line (review-rec REC-4: an older pod restarting in a rolling update refuses a
# database holding a migration it does not know, but puts its own functions back
# over any set that came without one).
FUNCTION_SETS = {
    32: "79ec8d786bd8b0e6985c2374223b54dc3068579343c0fe64db55972ddb353cb8",
    33: "66aaebde16a9ffe8a55db76658a7a1564c165dc9dd274e3a39de4516963a10e4",
}


def test_a_change_to_the_database_functions_comes_with_a_migration() -> None:
    versions = [version for version, _ in migrations("postgres")]
    digest, _texts = functions("postgres")
    recorded = max(FUNCTION_SETS)
    assert recorded in versions, f"FUNCTION_SETS names migration {recorded:04d}, not in the tree"
    assert FUNCTION_SETS[recorded] == digest, (
        "gateway/storage/sql/postgres/functions/ changed without a migration: add "
        f"gateway/storage/sql/postgres/{versions[-1] + 1:04d}_<name>.sql (an empty marker "
        f"will do, as 0032) and the line {versions[-1] + 1}: {digest!r} to FUNCTION_SETS "
        "(docs/deploy.md, 'Upgrading')"
    )
