"""deploy/: the compose file and the Dockerfile agree with each other and with vestis (they
cannot be started here; deploy/README.md says what was checked by hand)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def milvus_uris(command: list[str]) -> list[str]:
    return [arg for arg in command if arg.startswith("milvus://")]


def test_every_vestis_service_uses_the_milvus_service_of_the_file():
    services = compose()["services"]
    assert {"etcd", "minio", "milvus", "vestis", "ray-head", "ray-worker"} <= set(services)
    milvus = services["milvus"]
    assert milvus["environment"]["ETCD_ENDPOINTS"].split(":")[0] in services
    assert milvus["environment"]["MINIO_ADDRESS"].split(":")[0] in services
    port = next(p.split(":")[-1] for p in milvus["ports"])
    for name in ("vestis", "ingest"):
        service = services[name]
        [uri] = milvus_uris(service["command"])
        host_port = re.match(r"milvus://([^/:]+):(\d+)/\w+$", uri)
        assert host_port and host_port.groups() == ("milvus", port), uri
        assert "milvus" in service["depends_on"]
        assert service["image"] == "vestis:cpu"


def test_the_servers_listen_outside_the_container_and_need_the_token_to_write():
    services = compose()["services"]
    command = services["vestis"]["command"]
    assert command[0] == "serve"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert "--private" in command  # reachable from outside: reads need the token too
    secret = command[command.index("--token-file") + 1]
    assert secret == f"/run/secrets/{services['vestis']['secrets'][0]}"
    assert services["vestis"]["deploy"]["replicas"] >= 2


def test_ray_workers_and_the_ingest_join_the_head():
    services = compose()["services"]
    head = services["ray-head"]["command"]
    port = next(arg.split("=")[1] for arg in head if arg.startswith("--port="))
    worker = services["ray-worker"]["command"]
    assert f"--address=ray-head:{port}" in worker
    ingest = services["ingest"]["command"]
    assert ingest[0] == "index" and ingest[ingest.index("--ray") + 1] == f"ray-head:{port}"
    for name in ("ray-head", "ray-worker"):  # Ray on the cluster = Ray of the image
        assert services[name]["image"] == services["ingest"]["image"]


def test_the_dockerfile_installs_extras_that_exist_and_torch_for_the_cpu():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    optional = pyproject.split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^([\w-]+) = \[", optional, flags=re.M))
    wanted = re.search(r"ARG VESTIS_EXTRAS=(\S+)", dockerfile).group(1).split(",")
    assert "ray" in wanted and "ray" in extras
    assert "download.pytorch.org/whl/cpu" in dockerfile
    assert 'ENTRYPOINT ["vestis"]' in dockerfile
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for copied in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.M):
        for path in copied.split():
            assert f"!{path}" in ignored, path
