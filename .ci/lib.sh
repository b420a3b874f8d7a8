# Sourced by .ci/run, .ci/latest and .ci/lock: one fresh virtual environment per script, torch pinned
# to the local CPU build first (an unpinned resolver would pull GBs of CUDA wheels), then the rest.
TORCH_PIN="torch==2.13.0"
EXTRAS="test,triton,experiments,hf,docs"
# Test-only oracles installed with --no-deps, outside the lock and the package's extras:
# - ista-daslab-optimizers: the DCT oracle, its pure-torch part only (its dependencies need CUDA);
# - apollo-torch: the APOLLO oracle, CC-BY-NC (never a dependency of the package, never vendored); its
#   dependencies (torch, transformers, bitsandbytes) are all in the lock already.
ORACLES=("ista-daslab-optimizers==1.1.15" "apollo-torch==1.0.3")
# torchtitan (tests/integrations/test_torchtitan.py, lowrank_optim.integrations.torchtitan) is installed
# the same way, --no-deps after pip check: it declares datasets<4.8, which the lock's datasets (held up
# by transformers' huggingface-hub) does not satisfy, and its trainer's other dependencies (triton,
# torchdata, wandb, ...) are not needed. What its container path does import beyond the lock
# (python -X importtime -c "from torchtitan.components.optimizer import OptimizersContainer") is
# TORCHTITAN_IMPORTS: tyro (with docstring_parser and typeguard) and spmd_types, resolved by
# install_newest and therefore pinned in the lock like any other test dependency.
TORCHTITAN="torchtitan==0.3.0"
TORCHTITAN_IMPORTS=("tyro" "spmd_types==0.2.3")
LOCK=".ci/requirements.lock"

pip_quiet() { python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

# new_venv DIR: a fresh venv at DIR, activated, with torch installed from the pin.
new_venv() {
  rm -rf "$1"
  python3 -m venv "$1"
  # shellcheck disable=SC1091
  source "$1/bin/activate"
  pip_quiet "$TORCH_PIN"
  python -W ignore -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
}

# install_newest: the newest releases the package's ranges allow (torch held at the pin).
install_newest() {
  echo "$TORCH_PIN" > "$VIRTUAL_ENV/constraints.txt"
  pip_quiet --upgrade -c "$VIRTUAL_ENV/constraints.txt" setuptools -e ".[$EXTRAS]" "${TORCHTITAN_IMPORTS[@]}"
  pip_quiet -c "$VIRTUAL_ENV/constraints.txt" --no-deps "${ORACLES[@]}" "$TORCHTITAN"
}

# install_locked: exactly the versions of $LOCK, nothing resolved, then the package itself; pip check
# proves the lock complete (before the oracles, whose dependencies are left out on purpose).
install_locked() {
  pip_quiet --no-deps -r "$LOCK"
  pip_quiet --no-deps --no-build-isolation -e .
  python -m pip check
  pip_quiet --no-deps "${ORACLES[@]}" "$TORCHTITAN"
}

# freeze: every installed distribution but pip, the oracles, torchtitan and this package, torch written as its pin.
freeze() {
  python -m pip freeze --all --exclude-editable --disable-pip-version-check \
    | grep -v -i -E "^(pip|ista[-_]daslab[-_]optimizers|apollo[-_]torch|torchtitan)==" \
    | sed -E "s/^torch==.*/$TORCH_PIN/"
}

# build_docs: the documentation site (mkdocs.yml, docs/) built strictly, so a broken link, an unknown
# page or an API reference that does not resolve fails the run; the site goes to a temporary folder.
# (No --quiet: it hides the warnings from the strict check, and a broken link then passes.)
build_docs() {
  local site
  site=$(mktemp -d)
  NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --site-dir "$site"
  rm -rf "$site"
  echo "docs: mkdocs build --strict passed"
}

# run_tests: the README's test command (one OpenMP thread per process: several tests start two
# processes, and oversubscribed OpenMP spin-waits make a 2-core machine crawl).
run_tests() {
  export OMP_NUM_THREADS=1
  python -m pytest -q
}
