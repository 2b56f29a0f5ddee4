#!/bin/sh
# What the container image runs, as one script: the Dockerfile calls `install` when it builds
# and `start` as its entry point, and tests run both outside any container (no container runtime
# works on our CI machines), so the image is a thin shell over steps that are tested.
#
#   container.sh install SOURCE    SOURCE (a wheel, or a source folder) into a new venv at
#                                  $CLIPSEARCH_VENV, with the extras in $CLIPSEARCH_EXTRAS
#   container.sh start [ARGS...]   `clipsearch ARGS` (default: serve) with the container's
#                                  defaults; every one can be overridden by the environment
#   container.sh health            exit 0 when `serve` answers /health with 200 (model loaded)
set -eu

VENV="${CLIPSEARCH_VENV:-/opt/clipsearch}"
EXTRAS="${CLIPSEARCH_EXTRAS-postgres,faiss}"

# The defaults a container wants: listen on every interface (the port is published by the
# runtime), the database and caches on volumes, and a model that runs without torch.
defaults() {
    : "${CLIPSEARCH_HOST:=0.0.0.0}"
    : "${CLIPSEARCH_PORT:=8080}"
    : "${CLIPSEARCH_DB:=/data/clipsearch.db}"
    # a published ONNX model unless one is named (a database made with another model needs its
    # own: CLIPSEARCH_MODEL, or CLIPSEARCH_WEIGHTS for a folder from `clipsearch models export`)
    if [ -z "${CLIPSEARCH_MODEL:-}" ] && [ -z "${CLIPSEARCH_WEIGHTS:-}" ]; then
        CLIPSEARCH_MODEL=immich-app/ViT-B-32__openai
    fi
    : "${HF_HOME:=/cache/huggingface}"
    : "${CLIPSEARCH_ONNX_CACHE:=/cache/onnx}"
    export CLIPSEARCH_HOST CLIPSEARCH_PORT CLIPSEARCH_DB HF_HOME CLIPSEARCH_ONNX_CACHE
    if [ -n "${CLIPSEARCH_MODEL:-}" ]; then export CLIPSEARCH_MODEL; fi
}

case "${1:-}" in
install)
    source="${2:?usage: container.sh install WHEEL_OR_FOLDER}"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --no-cache-dir --disable-pip-version-check --quiet \
        "$source${EXTRAS:+[$EXTRAS]}"
    # fail the build, not the first request, if the command cannot start
    "$VENV/bin/clipsearch" --version
    ;;
start)
    shift
    defaults
    if [ "$#" -eq 0 ]; then set -- serve; fi
    exec "$VENV/bin/clipsearch" "$@"
    ;;
health)
    defaults
    exec "$VENV/bin/python" -c '
import sys, urllib.request
url = "http://127.0.0.1:%s/health" % sys.argv[1]
try:
    urllib.request.urlopen(url, timeout=5).read()
except Exception as e:
    sys.exit("unhealthy: %s" % e)
' "$CLIPSEARCH_PORT"
    ;;
*)
    echo "usage: container.sh install SOURCE | start [ARGS...] | health" >&2
    exit 2
    ;;
esac
