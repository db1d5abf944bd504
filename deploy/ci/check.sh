#!/usr/bin/env bash
# Validates what ships around the worker, each with its own field's tools:
#   container   hadolint on the Dockerfile
#   Kubernetes  kubectl kustomize (every overlay), kubernetes-validate --strict,
#               CRD schemas (@kubernetes-models), the deployment's promises
#   Prometheus  promtool check rules, promtool test rules, runbooks
#   Grafana     the dashboard against Grafana's schema types (@grafana/schema);
#               its structure; every query parses
#   live        a real Prometheus scrapes a real worker during a refresh run:
#               recording rules return data, promtool check metrics, every
#               metric name used is exported, every dashboard query evaluates
# Installs what it needs (pinned): Python tools into .venv, the Debian
# prometheus package when promtool is missing, npm packages in deploy/ci.
# Runs every check, then exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

VENV=${VENV:-.venv}
PY=$VENV/bin/python
START=$SECONDS

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'check.sh: %s\n' "$*" >&2; exit 2; }

# ---------------------------------------------------------------- install
say "install: tools (deploy/ci/requirements.txt, prometheus, npm packages)"
if [ ! -x "$PY" ]; then
    make install || die "make install failed"
fi
if ! cmp -s deploy/ci/requirements.txt "$VENV/.deploy-ci-requirements.txt"; then
    # (the grep drops warnings about local package mirrors some machines configure)
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        -c constraints.txt -r deploy/ci/requirements.txt 2>&1 | grep -v "^WARNING: Location '"
    [ "${PIPESTATUS[0]}" = 0 ] || die "pip install -r deploy/ci/requirements.txt failed"
    cp deploy/ci/requirements.txt "$VENV/.deploy-ci-requirements.txt"
fi
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq || die "apt-get update failed"
    $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
        || die "apt-get install prometheus failed"
fi
command -v node >/dev/null || die "node is required (the CRD and dashboard schema checks)"
if [ ! deploy/ci/node_modules/.package-lock.json -nt deploy/ci/package-lock.json ]; then
    (cd deploy/ci && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci failed"
fi
echo "hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}'), \
kubectl $("$VENV/bin/kubectl" version --client | awk '/Client/{print $3}'), \
kubernetes-validate $("$VENV/bin/kubernetes-validate" --version), \
$(promtool --version 2>&1 | head -1 | sed 's/,//; s/ (.*//'), node $(node --version)"
echo "installed in $((SECONDS - START))s"

# ----------------------------------------------------------------- checks
declare -a RESULTS=()
FAILED=0
check() {
    local name=$1
    shift
    say "$name"
    local t0=$SECONDS
    if "$@"; then
        RESULTS+=("ok      $name ($((SECONDS - t0))s)")
    else
        RESULTS+=("FAILED  $name ($((SECONDS - t0))s)")
        FAILED=1
    fi
}

check "generated rules, PrometheusRule and dashboard are up to date" \
    "$PY" dashboards/generate.py --check
check "ruff and mypy --strict on dashboards/ and deploy/ci/" bash -c "
    $VENV/bin/ruff check dashboards deploy/ci && $VENV/bin/ruff format --check dashboards deploy/ci \
    && $VENV/bin/mypy --strict dashboards/generate.py deploy/ci/*.py"
check "hadolint Dockerfile (zero findings)" \
    "$VENV/bin/hadolint" --failure-threshold style Dockerfile
check "Kubernetes: kustomize, kubernetes-validate --strict, CRD schemas, policy" \
    "$PY" deploy/ci/check_manifests.py
check "Grafana dashboard against @grafana/schema" \
    node deploy/ci/validate-dashboard.mjs dashboards/grafana/refreshd.json
check "promtool check rules" promtool check rules dashboards/prometheus/refreshd.rules.yml
check "promtool test rules" bash -c "cd dashboards/prometheus && promtool test rules refreshd.rules.test.yml"
check "rules, runbooks and dashboard structure" "$PY" deploy/ci/check_rules.py
check "end to end: Prometheus scrapes a worker; metric names; promtool check metrics" \
    "$PY" deploy/ci/e2e_prometheus.py

say "summary ($((SECONDS - START))s)"
printf '  %s\n' "${RESULTS[@]}"
if [ "$FAILED" != 0 ]; then
    echo "deploy checks FAILED"
    exit 1
fi
echo "deploy checks passed"
