#!/usr/bin/env bash
# Smoke test of the test images (build them first with tests/containers/build-images.sh):
# each image boots systemd as PID 1 on the podman network pitr-test, reaches "running" (or
# "degraded"), has postgresql@<major>-main active, and answers `select version()` with its major
# version through psql as the postgres user. The containers are removed afterwards.
#
# Usage: tests/containers/smoke.sh [15|17 ...]      (default: 15 17)
# Environment: PITR_SMOKE_BOOT_TIMEOUT seconds to wait for systemd (default 120)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
image_repo=localhost/pitr-pg
network=pitr-test
boot_timeout=${PITR_SMOKE_BOOT_TIMEOUT:-120}

majors=("$@")
[[ ${#majors[@]} -gt 0 ]] || majors=(15 17)

log() { printf '%s smoke: %s\n' "$(date +%H:%M:%S)" "$*"; }

command -v podman >/dev/null || { log "podman is not installed (run tests/containers/build-images.sh)"; exit 1; }

containers=()
cleanup() {
  [[ ${#containers[@]} -eq 0 ]] || podman rm -f -t 5 "${containers[@]}" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# Another test may create the network at the same moment: only fail if it is still missing.
podman network exists "$network" || podman network create "$network" >/dev/null 2>&1 ||
  podman network exists "$network" || { log "cannot create podman network $network"; exit 1; }

# system_state NAME: what systemd says, or "unreachable" while PID 1 is not answering yet.
system_state() {
  timeout 10 podman exec "$1" systemctl is-system-running 2>/dev/null || true
}

passed=0 failed=0
fail() { log "FAIL $*"; failed=$((failed + 1)); }

# Start all containers first: they boot concurrently.
declare -A name_of=()
for major in "${majors[@]}"; do
  image=$image_repo:$major
  if ! podman image exists "$image"; then
    fail "$image: no such image (run tests/containers/build-images.sh)"
    continue
  fi
  name=pitr-smoke-$major-$$
  containers+=("$name")
  if ! podman run -d --name "$name" --hostname "$name" --network "$network" --systemd=always \
    "$image" >/dev/null; then
    fail "$name: podman run failed"
    continue
  fi
  name_of[$major]=$name
  log "started $name from $image"
done

for major in "${majors[@]}"; do
  name=${name_of[$major]:-}
  [[ -n $name ]] || continue
  start=$SECONDS
  state=$(system_state "$name")
  while [[ $state != running && $state != degraded ]] && ((SECONDS - start < boot_timeout)); do
    sleep 1
    state=$(system_state "$name")
  done
  log "$name: systemd is '${state:-unreachable}' after $((SECONDS - start)) s"
  if [[ $state != running && $state != degraded ]]; then
    fail "$name: systemd did not finish booting within $boot_timeout s"
    podman logs --tail 20 "$name" 2>&1 | sed 's/^/  | /'
    continue
  fi
  if [[ $state == degraded ]]; then
    podman exec "$name" systemctl --failed --no-pager --plain | sed 's/^/  | /'
  fi

  unit=postgresql@$major-main
  if ! active=$(podman exec "$name" systemctl is-active "$unit"); then
    fail "$name: $unit is '$active'"
    podman exec "$name" systemctl status --no-pager "$unit" 2>&1 | sed 's/^/  | /'
    continue
  fi
  log "$name: $unit is $active"

  version=$(timeout 30 podman exec -u postgres "$name" psql -XAtc 'select version()' 2>&1) || true
  log "$name: $version"
  if [[ $version != "PostgreSQL $major."* ]]; then
    fail "$name: expected PostgreSQL $major, psql said: $version"
    continue
  fi
  passed=$((passed + 1))
done

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
