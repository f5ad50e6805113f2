#!/usr/bin/env bash
# Checks deploy/*.yaml and config/kubernetes/*.yaml against Kubernetes' OpenAPI schema, offline
# and strict (unknown fields are errors), with PyPI's kubernetes-validate (its schemas are in the
# package) in a private virtualenv under the cache; a broken manifest fails `make lint`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${KATA_CACHE_DIR:-/var/cache/kata-rs}/kubernetes-validate
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q kubernetes-validate
fi
# The validator must refuse a broken manifest, or a pass means nothing.
bad=$(mktemp --suffix=.yaml)
trap 'rm -f "$bad"' EXIT
printf 'apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: x\nhandler: kata\nnodeSelector: {}\n' > "$bad"
if "$venv/bin/kubernetes-validate" --strict --quiet "$bad" >/dev/null 2>&1; then
  echo "check-manifests: the validator accepted a RuntimeClass with an unknown field" >&2
  exit 1
fi
"$venv/bin/kubernetes-validate" --strict --quiet "$here"/deploy/*.yaml "$here"/config/kubernetes/*.yaml
echo "check-manifests: deploy/ and config/kubernetes/ match Kubernetes' schema"
