#!/usr/bin/env bash
# Run the molecule scenarios in podman containers (systemd as PID 1, PostgreSQL from Debian).
#
# Usage: tools/run-molecule.sh [SCENARIO ...]
#   With no argument, every scenario: each directory extensions/molecule/<name>/ holding a
#   molecule.yml. Other entries there (shared playbooks, a shared config.yml) are not scenarios
#   and are listed as such. Each scenario runs `molecule test -s <name>` from extensions/.
#
# Builds the images first (tests/containers/build-images.sh, cached) and checks that podman can
# run a container; fails if it cannot, if there is no scenario, or if any scenario fails.
# Environment: PITR_MOLECULE_TIMEOUT seconds allowed per scenario (default 1800).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CONTAINERS_CONF="${CONTAINERS_CONF:-$root/tests/containers/containers.conf}"
scenario_dir=$root/extensions/molecule
timeout_s=${PITR_MOLECULE_TIMEOUT:-1800}

log() { printf '%s run-molecule: %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { log "error: $*" >&2; exit 1; }

# The project's tools, not whatever python comes first on PATH.
[[ -x $root/.venv/bin/molecule ]] && PATH=$root/.venv/bin:$PATH
command -v molecule >/dev/null || die "molecule is not installed (make bootstrap creates .venv with it)"

shopt -s nullglob
all=()
for dir in "$scenario_dir"/*/; do
  name=$(basename "$dir")
  if [[ -f $dir/molecule.yml ]]; then
    all+=("$name")
  else
    log "extensions/molecule/$name is not a scenario (no molecule.yml): not run"
  fi
done

if [[ $# -gt 0 ]]; then
  scenarios=("$@")
  for name in "${scenarios[@]}"; do
    [[ -f $scenario_dir/$name/molecule.yml ]] || die "no scenario $name (no extensions/molecule/$name/molecule.yml)"
  done
else
  scenarios=("${all[@]}")
fi
[[ ${#scenarios[@]} -gt 0 ]] || die "no molecule scenario under extensions/molecule/"

bash "$root/tests/containers/build-images.sh"

# A scenario that fails in podman itself reads like a test failure: prove podman works first.
podman run --rm --network none localhost/pitr-pg:15 /bin/true ||
  die "podman cannot run a container here (CONTAINERS_CONF=$CONTAINERS_CONF)"

# Scenarios may use this checkout as the collection pitr.postgresql (the Makefile owns the link).
if [[ ! -e $root/build/collections/ansible_collections/pitr/postgresql ]]; then
  make -C "$root" --no-print-directory collection-link
fi
export ANSIBLE_COLLECTIONS_PATH=$root/build/collections
if [[ ! -t 1 ]]; then
  export ANSIBLE_NOCOLOR=1 NO_COLOR=1
fi

passed=0 failed=0 failed_names=()
cd "$root/extensions"
for name in "${scenarios[@]}"; do
  # Container names and molecule's state directory are per scenario: two runs of one scenario
  # at the same time (another engineer, another terminal) would destroy each other's containers.
  lock=/run/lock/pitr-molecule-${name//\//_}.lock
  start=$SECONDS
  log "scenario $name: molecule test"
  status=0
  flock -w "$timeout_s" "$lock" timeout --kill-after=30 "$timeout_s" molecule test -s "$name" || status=$?
  if [[ $status -eq 0 ]]; then
    passed=$((passed + 1))
    log "scenario $name passed in $((SECONDS - start)) s"
  else
    failed=$((failed + 1))
    failed_names+=("$name")
    log "scenario $name FAILED (exit $status) after $((SECONDS - start)) s"
  fi
done

[[ $failed -eq 0 ]] || log "failed scenarios: ${failed_names[*]}"
echo "molecule: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
