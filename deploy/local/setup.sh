#!/usr/bin/env bash
# Installs what flowtally needs on a fresh Debian machine, idempotently:
#   Debian packages (the real exporters and oracles the tests use), a Python venv in .venv with
#   flowtally and its pinned dependencies, and the pinned Kafka broker's jars (from Maven Central,
#   cached in ~/.cache/flowtally). Java 17 and Maven must already be installed.
set -euo pipefail
cd "$(dirname "$0")/../.."

APT_PACKAGES=(softflowd tshark nfdump pmacct conntrack iptables iproute2 graphviz openssl)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for tool in java mvn; do
  command -v "$tool" >/dev/null || { echo "setup: $tool is required (Java 17 + Maven run the local Kafka broker)" >&2; exit 1; }
done

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.flowtally-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ deploy/local/constraints.txt -nt "$stamp" ]; then
  echo "setup: installing Python dependencies"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c deploy/local/constraints.txt -e '.[test]'
  touch "$stamp"
fi

.venv/bin/python -c 'from flowtally.dev.localkafka import LocalKafka; LocalKafka("var/kafka").ensure_jars()'

# Deploy validators (tests/unit/test_deploy_*.py), Go binaries cached in ~/.cache/flowtally/bin:
#   flowtally-compose-validate: compose-go, the loader behind `docker compose config` (no Docker
#     engine needed), built from deploy/compose/validate (~20 s the first time);
#   helm: built from its Go module, pinned (~6 min the first time on 2 cores; then cached).
BIN="$HOME/.cache/flowtally/bin"
HELM_VERSION=v3.22.0
mkdir -p "$BIN"
if command -v go >/dev/null; then
  validate_src=deploy/compose/validate
  if [ ! -x "$BIN/flowtally-compose-validate" ] || [ "$validate_src/go.sum" -nt "$BIN/flowtally-compose-validate" ] \
     || [ "$validate_src/main.go" -nt "$BIN/flowtally-compose-validate" ]; then
    echo "setup: building the compose validator"
    (cd "$validate_src" && go build -trimpath -o "$BIN/flowtally-compose-validate" .)
  fi
  if ! "$BIN/helm" version --short 2>/dev/null | grep -q "^${HELM_VERSION%.*}"; then
    echo "setup: building helm $HELM_VERSION (a few minutes, once)"
    GOBIN="$BIN" go install -trimpath "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  fi
else
  echo "setup: go is required to build the deploy validators (compose-go, helm)" >&2
  exit 1
fi
