"""docker/: the compose file's services run as local processes on 127.0.0.1 (no container engine runs here), and
the Dockerfile, compose file and README agree with each other and with .ci/run."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import socket
import time
from typing import Any, Dict, List, Tuple

import pytest
import yaml

from peers.cli import parse_args
from peers.local import LocalSwarm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER = os.path.join(ROOT, "docker")
COMPOSE = os.path.join(DOCKER, "compose.yaml")
DOCKERFILE = os.path.join(DOCKER, "Dockerfile")
DNS_ADDR = re.compile(r"/dns4/([A-Za-z0-9_.-]+)/tcp/(\d+)")


def load_compose() -> Dict[str, Any]:
    with open(COMPOSE) as f:
        return yaml.safe_load(f)


def active_services(compose: Dict[str, Any], profiles=()) -> Dict[str, Dict[str, Any]]:
    """The services `docker compose [--profile P] up` starts."""
    return {
        name: svc
        for name, svc in compose["services"].items()
        if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container_ports(compose) -> List[int]:
    ports = []
    for svc in compose["services"].values():
        for spec in svc.get("ports", []):
            ports.append(int(str(spec).split(":")[-1].split("/")[0]))
    return ports


class Localizer:
    """Turns a compose service into a local process: service hostnames -> 127.0.0.1, published container ports ->
    free local ports, 0.0.0.0 -> 127.0.0.1, mounted paths -> the host files (config files rewritten likewise)
    or a temporary directory per named volume."""

    def __init__(self, compose: Dict[str, Any], tmp: str):
        self.compose = compose
        self.tmp = tmp
        self.hosts = set(compose["services"])
        self.ports = {port: free_port() for port in container_ports(compose)}
        self.mounts: Dict[str, str] = {}  # container path -> local path (the same for every service)
        self.configs: Dict[str, str] = {}  # config file in docker/ -> its rewritten local copy
        for svc in compose["services"].values():
            for spec in svc.get("volumes", []):
                src, dst = str(spec).split(":")[:2]
                if src.startswith((".", "/")):
                    local = os.path.normpath(os.path.join(DOCKER, src))
                    assert os.path.exists(local), f"{spec}: {local} is missing"
                    if local.endswith((".yaml", ".yml", ".toml")):
                        out = os.path.join(tmp, "config", os.path.basename(local))
                        self.configs[local] = out
                        local = out
                else:
                    assert src in (compose.get("volumes") or {}), f"named volume {src} is not declared"
                    local = os.path.join(tmp, "volumes", src)
                    os.makedirs(local, exist_ok=True)
                assert self.mounts.get(dst, local) == local, f"{dst} is mounted from different sources"
                self.mounts[dst] = local

    def text(self, value: str) -> str:
        def addr(m):
            assert m[1] in self.hosts, f"{m[0]}: no service named {m[1]}"
            return f"/ip4/127.0.0.1/tcp/{self.ports.get(int(m[2]), int(m[2]))}"

        value = DNS_ADDR.sub(addr, value).replace("0.0.0.0", "127.0.0.1")
        for dst, local in sorted(self.mounts.items(), key=lambda kv: -len(kv[0])):
            if value == dst or value.startswith(dst.rstrip("/") + "/"):
                return local + value[len(dst) :]
        return value

    def value(self, value):
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            return self.ports.get(value, value)
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        return value

    def finish_configs(self) -> None:
        """Write the mounted config files with hosts, ports and paths made local."""
        for src, out in self.configs.items():
            with open(src) as f:
                data = yaml.safe_load(f)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "w") as f:
                yaml.safe_dump(self.value(data), f)

    def command(self, svc: Dict[str, Any]) -> List[str]:
        cmd = svc["command"]
        cmd = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        return [self.text(str(arg)) for arg in cmd]

    def environment(self, svc: Dict[str, Any]) -> Dict[str, str]:
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        return {k: self.text(str(v)) for k, v in env.items()}


def start_order(services: Dict[str, Dict[str, Any]]) -> List[str]:
    order: List[str] = []

    def visit(name, path=()):
        assert name not in path, f"depends_on cycle through {name}"
        if name in order:
            return
        deps = services[name].get("depends_on") or []
        for dep in deps if isinstance(deps, list) else list(deps):
            visit(dep, path + (name,))
        order.append(name)

    for name in services:
        visit(name)
    return order


def config_of(compose) -> Tuple[str, Dict[str, Any]]:
    """The config file the services read (its container path) and its contents."""
    cmd = compose["services"]["bootstrap"]["command"]
    path = cmd[cmd.index("--config") + 1]
    mount = next(
        str(v).split(":")[0]
        for v in compose["services"]["bootstrap"]["volumes"]
        if str(v).split(":")[1] == path
    )
    with open(os.path.join(DOCKER, mount)) as f:
        return path, yaml.safe_load(f)


# ---------------------------------------------------------------- the compose swarm, as local processes


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compose_services_run_as_local_processes(tmp_path):
    compose = load_compose()
    services = active_services(compose)
    loc = Localizer(compose, str(tmp_path))
    loc.finish_configs()
    # keep it short: `--scale stageK=1`, and flags (which win over the config file) for a tiny run
    extra = {"dht": ["--target-batch-size", "16"], "train": ["--steps", "3", "--max-inflight", "2"]}
    swarm = LocalSwarm(str(tmp_path / "logs"))
    base_env = dict(swarm.env)
    started = time.monotonic()
    try:
        for name in start_order(services):
            svc = services[name]
            cmd = loc.command(svc)
            role = cmd[0]
            assert "0.0.0.0" not in " ".join(cmd) and "/dns4/" not in " ".join(cmd)
            swarm.env = dict(base_env, **loc.environment(svc))
            child = swarm.spawn(
                name,
                {"dht": "bootstrap", "serve": "stage", "train": "trainer"}[role],
                cmd + extra.get(role, []),
                stage=int(cmd[cmd.index("--stage") + 1]) if "--stage" in cmd else None,
            )
            if role == "dht":
                info = child.wait_event("dht", 90)
                # the address the other services use (fixed identity + fixed port) is the bootstrap's own
                local_config = open(loc.mounts[config_of(compose)[0]]).read()
                assert "/dns4/" not in local_config and "0.0.0.0" not in local_config
                port = loc.ports[container_ports(compose)[0]]
                assert any(a.startswith(f"/ip4/127.0.0.1/tcp/{port}/p2p/") for a in info["initial_peers"]), (
                    info
                )
                assert info["peer_id"] == bootstrap_peer_id()
            elif role == "serve":
                child.wait_event("serve", 180)
            else:
                trainer = child
        assert trainer.proc.wait(timeout=max(30, 540 - (time.monotonic() - started))) == 0, open(
            trainer.log_path
        ).read()[-3000:]
    finally:
        swarm.stop()
    results = loc.mounts["/results"]
    rows = [json.loads(line) for line in open(os.path.join(results, "metrics.jsonl")) if line.strip()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in rows)
    assert all(r["completed"] == 2 for r in rows)  # per step: --target-batch-size 16 / micro-batches of 8
    summary = json.load(open(os.path.join(results, "summary.json")))
    assert summary["steps"] == 3 and summary["microbatches"]["completed"] == 6
    assert summary["microbatches"]["dropped"] == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bootstrap_address_form_works(tmp_path):
    """The compose peers join with /dns4/bootstrap/tcp/PORT/p2p/ID: a DNS name, resolved by the p2p daemon, and
    the peer id of the committed key. Here the name is `localhost` (127.0.0.1) and the port a free one."""
    import hivemind
    from hivemind.utils import get_dht_time

    _, config = config_of(load_compose())
    addr = config["serve"]["initial_peers"][0]
    port = free_port()
    local_addr = DNS_ADDR.sub(f"/dns4/localhost/tcp/{port}", addr)
    assert local_addr.endswith(f"/p2p/{bootstrap_peer_id()}")
    boot = hivemind.DHT(
        host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"],
        identity_path=os.path.join(DOCKER, "bootstrap.key"),
        start=True,
    )
    try:
        assert str(boot.peer_id) == bootstrap_peer_id()
        peer = hivemind.DHT(initial_peers=[local_addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        try:
            assert boot.store("probe", 42, get_dht_time() + 60)
            got = peer.get("probe", latest=True)
            assert got is not None and got.value == 42
        finally:
            peer.shutdown()
    finally:
        boot.shutdown()


# ---------------------------------------------------------------- static agreement: Dockerfile, compose, README


def bootstrap_peer_id() -> str:
    from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID

    with open(os.path.join(DOCKER, "bootstrap.key"), "rb") as f:
        return PeerID.from_identity(f.read()).to_base58()


def torch_pin(text: str) -> str:
    pins = set(re.findall(r"torch==([0-9][0-9A-Za-z.+]*)", text))
    assert len(pins) == 1, pins
    return pins.pop()


def dockerfile_instructions() -> List[Tuple[str, str]]:
    text = open(DOCKERFILE).read().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_installs_what_ci_installs_and_runs_swarm():
    instructions = dockerfile_instructions()
    entry = [json.loads(rest) for word, rest in instructions if word == "ENTRYPOINT"]
    assert entry[-1] == ["swarm"]
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert re.search(
        r'^swarm = "peers\.cli:entrypoint"', pyproject, re.M
    )  # the console script the image runs
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert torch_pin(runs) == torch_pin(ci)
    assert "download.pytorch.org/whl/cpu" in open(DOCKERFILE).read()  # the default is the CPU wheel
    assert re.search(r"pip install (\S+ )*\.( |$)", runs)  # the project itself
    # the image holds what pip needs to build the project
    copied = " ".join(rest for word, rest in instructions if word == "COPY")
    for needed in ("pyproject.toml", "README.md", "swarm", "peers"):
        assert re.search(rf"(^| ){re.escape(needed)}( |/|$)", copied), needed
    # one FROM, its image a build argument: the legacy builder (compose v1's) pulls the image of every FROM, so a
    # CUDA stage beside the CPU one made every CPU build pull a CUDA image
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert froms == ["${BASE_IMAGE}"], froms
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert "nvidia/cuda" not in open(DOCKERFILE).read().split("\nARG BASE_IMAGE")[1]
    # CPU by default; VARIANT picks torch's index (cpu: the CPU wheel; cuda: PyPI's, which bundles CUDA)
    assert ("ARG", "VARIANT=cpu") in instructions
    assert re.search(r"cpu\) index=https://download\.pytorch\.org/whl/cpu ;", runs)
    assert re.search(r"cuda\) index=https://pypi\.org/simple ;", runs)


def test_compose_file_is_consistent(tmp_path):
    compose = load_compose()
    path, config = config_of(compose)
    stages = config["dht"]["stages"]
    services = compose["services"]
    assert {"bootstrap", "trainer"} <= set(services)
    stage_services = {
        name: svc
        for name, svc in services.items()
        if not svc.get("profiles") and svc["command"][0] == "serve"
    }
    assert sorted(
        int(s["command"][s["command"].index("--stage") + 1]) for s in stage_services.values()
    ) == list(range(stages)), "one service per stage"
    for svc in stage_services.values():
        assert "ports" not in svc and "container_name" not in svc  # so `--scale stageK=N` works
    byz = [svc for svc in services.values() if "byzantine" in (svc.get("profiles") or [])]
    assert len(byz) == 1 and "--attack" in byz[0]["command"]
    # the bootstrap's fixed address: key -> peer id, fixed port, published
    peer_id = bootstrap_peer_id()
    addrs = set(
        re.findall(r"/dns4/bootstrap/tcp/\d+/p2p/\w+", open(os.path.join(DOCKER, "swarm.yaml")).read())
    )
    assert addrs == {f"/dns4/bootstrap/tcp/{config['dht']['port']}/p2p/{peer_id}"}
    assert f"{config['dht']['port']}:{config['dht']['port']}" in services["bootstrap"]["ports"]
    assert peer_id in open(COMPOSE).read()  # the comment quotes the address users need
    # every service's command parses (config file included), as the container's `swarm` would parse it
    loc = Localizer(compose, str(tmp_path))
    loc.finish_configs()
    for name, svc in services.items():
        args = parse_args(loc.command(svc))
        assert args.command in ("dht", "serve", "train"), name
        networks = svc.get("networks") or []
        assert networks == ["swarm"], name


def readme_docker_section() -> str:
    text = open(os.path.join(ROOT, "docs", "operations.md")).read()
    m = re.search(r"^## Docker\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, "docs/operations.md has no '## Docker' section"
    return m.group(1)


def readme_commands(section: str) -> List[List[str]]:
    cmds = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith(("docker ", "swarm ")):
                cmds.append(shlex.split(line))
    return cmds


def test_readme_docker_commands_match_the_files(tmp_path):
    compose = load_compose()
    services = compose["services"]
    profiles = {p for svc in services.values() for p in svc.get("profiles", [])}
    cmds = readme_commands(readme_docker_section())
    assert cmds, "no docker commands in the README's Docker section"
    kinds = set()
    config_path = config_of(compose)[0]
    loc = Localizer(compose, str(tmp_path))
    loc.finish_configs()
    for cmd in cmds:
        if cmd[:2] == ["docker", "build"]:
            kinds.add("build")
            assert cmd[cmd.index("-f") + 1] == "docker/Dockerfile" and cmd[-1] == "."
            assert cmd[cmd.index("-t") + 1] in {services["bootstrap"]["image"], "swarm:cuda"}
            for i, arg in enumerate(cmd):
                if arg == "--build-arg":
                    key, value = cmd[i + 1].split("=", 1)
                    assert key in ("VARIANT", "TORCH_INDEX_URL", "BASE_IMAGE")
                    if key == "VARIANT":
                        assert f" {value}) index=" in open(DOCKERFILE).read()
            continue
        if cmd[0] == "swarm":  # run on the host against the published port
            kinds.add("host-swarm")
            args = parse_args(cmd[1:])
            port = services["bootstrap"]["ports"][0].split(":")[0]
            assert any(f"/tcp/{port}/p2p/{bootstrap_peer_id()}" in a for a in args.initial_peers)
            continue
        assert cmd[:4] == ["docker", "compose", "-f", "docker/compose.yaml"], cmd
        rest = cmd[4:]
        while rest and rest[0] == "--profile":
            assert rest[1] in profiles, rest[1]
            kinds.add("profile")
            rest = rest[2:]
        sub, rest = rest[0], rest[1:]
        kinds.add(sub)
        if sub == "up":
            for i, arg in enumerate(rest):
                if arg == "--scale":
                    svc, n = rest[i + 1].split("=")
                    assert svc in services and int(n) >= 1
                    kinds.add("scale")
        elif sub in ("exec", "run", "logs"):
            opts = [a for a in rest if not a.startswith("-")]
            assert opts[0] in services, opts[0]
            if sub in ("exec", "run") and len(opts) > 1:
                assert opts[1] == "swarm", cmd
                argv = [
                    loc.mounts.get(a, a) if a == config_path else a for a in rest[rest.index("swarm") + 1 :]
                ]
                args = parse_args(argv)
                kinds.add(f"exec-{args.command}")
    # the README shows: build, start, scale, the Byzantine profile, and `swarm status` inside and outside
    assert {"build", "up", "scale", "profile", "exec-status", "host-swarm", "down"} <= kinds, kinds


# ---------------------------------------------------------------- the real thing: docker/e2e.sh


@pytest.mark.long
@pytest.mark.timeout(1800)
def test_compose_swarm_in_real_containers(tmp_path):
    """docker/e2e.sh: an engine (started, or installed from Debian, if needed), the image (on a base made with
    debootstrap where no registry answers), the compose swarm, 3 steps, `swarm status --json` from the host,
    teardown. It skips, saying why, where no engine can start; it bounds its own time (SWARM_E2E_TIMEOUT)."""
    import subprocess
    import sys

    out = tmp_path / "figures.json"
    env = dict(
        os.environ,
        SWARM_E2E_OUT=str(out),
        SWARM_E2E_TIMEOUT="1500",
        SWARM_E2E_STEPS="3",
        SWARM_E2E_REPLICAS="2",
        # the host-side `swarm status` runs this checkout, whatever is installed
        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
        PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
    )
    env.pop("SWARM_E2E_BASE_IMAGE", None)
    proc = subprocess.run(
        ["bash", os.path.join(DOCKER, "e2e.sh")], capture_output=True, text=True, env=env, timeout=1700
    )
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("docker/e2e.sh: skipped: ")]
    if skipped and proc.returncode == 0:
        pytest.skip(skipped[-1])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    figures = json.loads(out.read_text())
    print("docker/e2e.sh figures:", json.dumps(figures))  # shown with -s; the docs quote them
    assert figures["steps"] == 3 and figures["replicas"] == 2
    assert math.isfinite(figures["loss_last"]) and figures["loss_last"] < figures["loss_first"]
    # the host reached every stage peer at the address it announced (its container's, not loopback)
    assert len(figures["stage_peers_reached_from_host"]) == 4
    assert not any(a.startswith("127.") for a in figures["stage_peers_reached_from_host"])
    status = json.loads((tmp_path / "figures.status.json").read_text())
    assert [stage["online"] for stage in status["stages"]] == [2, 2]
    # torn down: no container of the project is left
    left = subprocess.run(
        ["docker", "ps", "-aq", "--filter", "label=com.docker.compose.project=swarm-e2e"],
        capture_output=True,
        text=True,
    )
    assert left.stdout.strip() == "" or left.returncode != 0, left.stdout
