#!/usr/bin/env bash
# The compose swarm in real containers, end to end: start a container engine if none runs, build the image, run
# docker/compose.yaml, wait for the trainer to finish a few steps, read `swarm status --json` from the host through
# the bootstrap peer's published port, check what it says, and tear everything down (also on failure or timeout).
#
#   bash docker/e2e.sh                      # from anywhere; prints one JSON line of figures at the end
#
# Where no engine can run (no dockerd and no way to install Debian's docker.io, or dockerd fails to start) it
# prints "docker/e2e.sh: skipped: WHY" and exits 0. Failures exit 1, saying what failed.
#
# Environment (all optional):
#   SWARM_E2E_STEPS=3          steps the trainer trains (SWARM_STEPS in the trainer's container)
#   SWARM_E2E_REPLICAS=1       replicas per stage (--scale stageK=N)
#   SWARM_E2E_TIMEOUT=3000     seconds for the whole script, engine install and image build included
#   SWARM_E2E_COMPOSE="docker-compose"   the compose command (default: `docker compose` (v2) if it works, else
#                              `docker-compose` (v1), installed from Debian where missing)
#   SWARM_E2E_BASE_IMAGE=IMG   the image to build on (default: python:3.11-slim if present or pullable, else a
#                              Debian bookworm image made here with debootstrap, swarm-base:bookworm)
#   SWARM_E2E_OUT=FILE         also write the figures there (JSON)
#   SWARM_E2E_KEEP_ENGINE=1    leave a dockerd this script started running (default: stop it)
set -uo pipefail
# the whole script is one block, read before it runs: editing the file meanwhile cannot change a run
{
cd "$(dirname "$0")/.."
ROOT=$(pwd)

STEPS=${SWARM_E2E_STEPS:-3}
REPLICAS=${SWARM_E2E_REPLICAS:-1}
TIMEOUT=${SWARM_E2E_TIMEOUT:-3000}
PROJECT=swarm-e2e
IMAGE=swarm:local
STARTED=$(date +%s)
DEADLINE=$((STARTED + TIMEOUT))
WORK=$(mktemp -d /tmp/swarm-e2e.XXXXXX)
DOCKERD_PID=
HTTP_PID=
COMPOSE=()
UP=0

log() { echo "docker/e2e.sh: $*"; }
skip() {
    echo "docker/e2e.sh: skipped: $*"
    exit 0
}
fail() {
    echo "docker/e2e.sh: FAILED: $*" >&2
    exit 1
}
left() { echo $((DEADLINE - $(date +%s))); }
# run a command within what is left of the time budget
bounded() {
    local t
    t=$(left)
    ((t > 0)) || fail "out of time (SWARM_E2E_TIMEOUT=${TIMEOUT}s) before: $*"
    timeout -s KILL "$t" "$@"
}

teardown() {
    local rc=$?
    trap - EXIT INT TERM
    if ((UP)); then
        log "tearing down the compose project $PROJECT"
        if ((rc != 0)); then
            "${COMPOSE[@]}" logs --no-color --tail 40 >"$WORK/compose-logs.txt" 2>&1 || true
            tail -n 80 "$WORK/compose-logs.txt" >&2 || true
        fi
        timeout -s KILL 120 "${COMPOSE[@]}" --profile byzantine down -v --remove-orphans -t 20 >/dev/null 2>&1 ||
            log "compose down failed; containers of project $PROJECT may be left"
    fi
    [[ -n $HTTP_PID ]] && kill "$HTTP_PID" 2>/dev/null
    if [[ -n $DOCKERD_PID && -z ${SWARM_E2E_KEEP_ENGINE:-} ]]; then
        log "stopping the dockerd this script started (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap teardown EXIT
trap 'fail "interrupted"' INT TERM

# ------------------------------------------------------------------------------------------------ the engine
engine_up() { timeout 20 docker info >/dev/null 2>&1; }

if ! engine_up; then
    if ! command -v dockerd >/dev/null; then
        if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
            log "no dockerd: installing Debian's docker.io"
            (bounded apt-get update -qq && DEBIAN_FRONTEND=noninteractive bounded apt-get install -y -qq docker.io) \
                >"$WORK/apt.log" 2>&1 || skip "no container engine, and Debian's docker.io did not install ($(tail -n 1 "$WORK/apt.log"))"
        else
            skip "no container engine (dockerd), and no root apt-get to install Debian's docker.io"
        fi
    fi
    command -v docker >/dev/null || skip "dockerd is installed but no docker client"
    [[ $(id -u) == 0 ]] || skip "dockerd is not running and starting it needs root"
    log "starting dockerd (log: /tmp/swarm-e2e-dockerd.log)"
    setsid dockerd >/tmp/swarm-e2e-dockerd.log 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do
        engine_up && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 1
    done
    engine_up || skip "dockerd did not start: $(grep -iE 'level=(error|fatal)' /tmp/swarm-e2e-dockerd.log | tail -n 1)"
fi
log "engine: docker $(docker version -f '{{.Server.Version}}' 2>/dev/null)"

# compose: v2 (`docker compose`) if present, else v1 (`docker-compose`, Debian's)
if [[ -n ${SWARM_E2E_COMPOSE:-} ]]; then
    read -r -a COMPOSE <<<"$SWARM_E2E_COMPOSE"
elif docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    if ! command -v docker-compose >/dev/null && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        log "no compose: installing Debian's docker-compose"
        (bounded apt-get update -qq && DEBIAN_FRONTEND=noninteractive bounded apt-get install -y -qq docker-compose) \
            >"$WORK/apt.log" 2>&1 || true
    fi
    command -v docker-compose >/dev/null || skip "no compose (neither \`docker compose\` nor docker-compose)"
    COMPOSE=(docker-compose)
fi
log "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || "${COMPOSE[@]}" version | head -n 1))"

# ------------------------------------------------------------------------------------------------ the base image
BASE_S=0
BASE=${SWARM_E2E_BASE_IMAGE:-}
if [[ -z $BASE ]]; then
    if docker image inspect python:3.11-slim >/dev/null 2>&1 ||
        timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1; then
        BASE=python:3.11-slim
    elif docker image inspect swarm-base:bookworm >/dev/null 2>&1; then
        BASE=swarm-base:bookworm
        log "no image registry reached; using swarm-base:bookworm, made from Debian packages by an earlier run"
    else
        log "no image registry reached: making swarm-base:bookworm from Debian packages (debootstrap)"
        [[ $(id -u) == 0 ]] || skip "no image registry, and debootstrap needs root"
        if ! command -v debootstrap >/dev/null; then
            (bounded apt-get update -qq && DEBIAN_FRONTEND=noninteractive bounded apt-get install -y -qq debootstrap) \
                >"$WORK/apt.log" 2>&1 || skip "no image registry, and debootstrap did not install"
        fi
        t0=$(date +%s)
        rootfs="$WORK/rootfs"
        bounded debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 ||
            fail "debootstrap failed: $(tail -n 3 "$WORK/debootstrap.log")"
        # the image trusts what this host trusts (a TLS-inspecting proxy's CA, say): pip in the build needs it
        if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
            cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
            chroot "$rootfs" update-ca-certificates >/dev/null 2>&1 || fail "update-ca-certificates failed in the rootfs"
        fi
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -c . | bounded docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' --change 'CMD ["/bin/bash"]' - swarm-base:bookworm >/dev/null ||
            fail "docker import of the rootfs failed"
        rm -rf "$rootfs"
        BASE=swarm-base:bookworm
        BASE_S=$(($(date +%s) - t0))
        log "swarm-base:bookworm made in ${BASE_S}s ($(docker image inspect -f '{{.Size}}' "$BASE" | awk '{printf "%.0f MB", $1/1e6}'))"
    fi
fi
log "base image: $BASE"

# ------------------------------------------------------------------------------------------------ the image
# torch comes from the PyTorch CPU index (the Dockerfile's default). Where that index cannot be reached, this host's
# pip fetches the pinned CPU wheel and its dependencies into a wheelhouse, served to the build on 127.0.0.1 as a
# package index (the build then runs on the host's network).
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE")
if ! timeout 15 curl -sf -o /dev/null https://download.pytorch.org/whl/cpu/torch/ 2>/dev/null; then
    pin=$(grep -o 'torch==[0-9][0-9A-Za-z.+]*' docker/Dockerfile | head -n 1)
    [[ -n $pin ]] || fail "no torch pin in docker/Dockerfile"
    PY=$(command -v python3 || command -v python)
    log "the PyTorch CPU index is not reachable: serving ${pin}+cpu from a local wheelhouse"
    bounded "$PY" -m pip download -q --only-binary :all: -d "$WORK/wheels" "${pin}+cpu" >"$WORK/pip.log" 2>&1 ||
        skip "neither the PyTorch CPU index nor this host's pip has ${pin}+cpu ($(tail -n 1 "$WORK/pip.log"))"
    if compgen -G "$WORK/wheels/nvidia*" >/dev/null; then fail "the wheelhouse holds CUDA packages"; fi
    "$PY" - "$WORK/wheels" "$WORK/simple" <<'EOF' || fail "could not lay out the wheelhouse"
import os, re, shutil, sys
src, dst = sys.argv[1:]
for name in os.listdir(src):
    project = re.sub(r"[-_.]+", "-", name.split("-")[0]).lower()
    os.makedirs(os.path.join(dst, project), exist_ok=True)
    shutil.move(os.path.join(src, name), os.path.join(dst, project, name))
EOF
    # a fixed port where free: the index URL is a build argument, so a new port would rebuild the torch layer
    port=$("$PY" -c 'import socket
s = socket.socket()
try:
    s.bind(("127.0.0.1", 31380))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
    "$PY" -m http.server -b 127.0.0.1 -d "$WORK" "$port" >"$WORK/http.log" 2>&1 &
    HTTP_PID=$!
    BUILD_ARGS+=(--network host --build-arg "TORCH_INDEX_URL=http://127.0.0.1:$port/simple")
fi
log "building $IMAGE from docker/Dockerfile (${BUILD_ARGS[*]})"
t0=$(date +%s)
bounded docker build -f docker/Dockerfile -t "$IMAGE" "${BUILD_ARGS[@]}" . >"$WORK/build.log" 2>&1 ||
    fail "docker build failed: $(tail -n 15 "$WORK/build.log")"
BUILD_S=$(($(date +%s) - t0))
[[ -n $HTTP_PID ]] && kill "$HTTP_PID" 2>/dev/null && HTTP_PID=
IMAGE_BYTES=$(docker image inspect -f '{{.Size}}' "$IMAGE")
log "built $IMAGE in ${BUILD_S}s, $(awk -v b="$IMAGE_BYTES" 'BEGIN{printf "%.2f GB", b/1e9}')"
if docker run --rm --entrypoint sh "$IMAGE" -c 'pip list 2>/dev/null | grep -qi "^nvidia-"'; then
    fail "the CPU image holds CUDA packages"
fi

# ------------------------------------------------------------------------------------------------ the swarm
# the run's shape: a few steps (SWARM_STEPS: the environment wins over the config file) and N replicas per stage
cat >"$WORK/e2e.override.yaml" <<EOF
services:
  trainer:
    environment:
      SWARM_STEPS: "$STEPS"
EOF
COMPOSE_NAME="${COMPOSE[*]} $("${COMPOSE[@]}" version --short 2>/dev/null)"
COMPOSE+=(-p "$PROJECT" -f docker/compose.yaml -f "$WORK/e2e.override.yaml")
if timeout 5 bash -c '</dev/tcp/127.0.0.1/31337' 2>/dev/null; then
    fail "port 31337 on this host is taken (the compose file publishes the bootstrap peer there)"
fi
log "starting the compose swarm: bootstrap, 2 stages x $REPLICAS, trainer ($STEPS steps)"
UP=1
t0=$(date +%s)
bounded "${COMPOSE[@]}" up -d --no-build --scale "stage0=$REPLICAS" --scale "stage1=$REPLICAS" \
    >"$WORK/up.log" 2>&1 || fail "compose up failed: $(tail -n 10 "$WORK/up.log")"
trainer=$("${COMPOSE[@]}" ps -a -q trainer)
[[ -n $trainer ]] || fail "no trainer container"
status=
while :; do
    status=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}' "$trainer")
    [[ $status == exited* ]] && break
    (($(left) > 0)) || fail "the trainer did not finish $STEPS steps within the time budget ($status)"
    sleep 5
done
TRAIN_S=$(($(date +%s) - t0))
[[ $status == "exited 0 "* ]] || fail "the trainer exited: $status ($(docker logs --tail 20 "$trainer" 2>&1))"
log "the trainer finished in ${TRAIN_S}s after compose up ($(docker logs --tail 1 "$trainer" 2>&1))"
docker cp "$trainer:/results/metrics.jsonl" "$WORK/metrics.jsonl" || fail "no metrics.jsonl in the results volume"
docker cp "$trainer:/results/summary.json" "$WORK/summary.json" || fail "no summary.json in the results volume"

# `swarm status --json` from the host, through the published port of the bootstrap peer
peer_id=$(grep -o '/dns4/bootstrap/tcp/31337/p2p/Qm[A-Za-z0-9]*' docker/swarm.yaml | head -n 1 | sed 's|.*/p2p/||')
if command -v swarm >/dev/null; then SWARM=(swarm); else SWARM=(python3 -m peers.cli); fi
bounded "${SWARM[@]}" status --initial-peers "/ip4/127.0.0.1/tcp/31337/p2p/$peer_id" --run-id swarm --json \
    >"$WORK/status.json" 2>"$WORK/status.err" || fail "swarm status from the host failed: $(tail -n 3 "$WORK/status.err")"

# check what the host read; reach every stage peer at the address it announces
python3 - "$WORK" "$STEPS" "$REPLICAS" "$((${BASE_S}))" "$BUILD_S" "$IMAGE_BYTES" "$TRAIN_S" "$STARTED" \
    "$COMPOSE_NAME" "$BASE" >"$WORK/figures.json" <<'EOF' || fail "the checks above failed"
import json, math, os, socket, sys, time

work, steps, replicas, base_s, build_s, image_bytes, train_s, started, compose, base = sys.argv[1:]
steps, replicas = int(steps), int(replicas)
rows = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl")) if line.strip()]
assert [r["step"] for r in rows] == list(range(steps)), rows
assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in rows), rows
summary = json.load(open(os.path.join(work, "summary.json")))
assert summary["steps"] == steps and summary["microbatches"]["dropped"] == 0, summary["microbatches"]
status = json.load(open(os.path.join(work, "status.json")))
assert status["run_id"] == "swarm" and status["num_stages"] == 2, status
trainers = status["trainers"]
assert trainers and trainers[0]["state"] == "finished" and trainers[0]["step"] == steps, trainers
reached = []
for stage in status["stages"]:
    online = [p for p in stage["peers"] if p["state"] == "online"]
    assert len(online) == replicas, (stage["stage"], stage["peers"])
    for peer in online:
        addr = peer["address"] or ""
        # announced: the container's own address first, never loopback (other containers and the host dial it)
        assert addr.startswith("/ip4/") and not addr.startswith("/ip4/127."), peer
        parts = addr.split("/")
        host, port = parts[2], int(parts[4])
        with socket.create_connection((host, port), timeout=5):
            reached.append(f"{host}:{port}")
figures = {
    "compose": compose,
    "base_image": base,
    "base_image_s": int(base_s),
    "image_build_s": int(build_s),
    "image_bytes": int(image_bytes),
    "steps": steps,
    "replicas": replicas,
    "loss_first": rows[0]["loss"],
    "loss_last": rows[-1]["loss"],
    "train_s": int(train_s),
    "stage_peers_reached_from_host": reached,
    "total_s": int(time.time()) - int(started),
}
print(json.dumps(figures))
EOF
log "swarm status from the host:"
bounded "${SWARM[@]}" status --initial-peers "/ip4/127.0.0.1/tcp/31337/p2p/$peer_id" --run-id swarm 2>&1 || true
if [[ -n ${SWARM_E2E_OUT:-} ]]; then
    cp "$WORK/figures.json" "$SWARM_E2E_OUT"
    cp "$WORK/status.json" "${SWARM_E2E_OUT%.json}.status.json"
fi
log "passed"
cat "$WORK/figures.json"
exit 0
}
