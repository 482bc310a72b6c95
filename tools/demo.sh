#!/usr/bin/env bash
# The whole story in one command (`make demo`, which runs `make bootstrap` first):
#
#   1. two Debian 12 servers with PostgreSQL 15 under systemd (podman containers): a primary
#      and a restore host, sharing one repository (a podman volume standing in for network
#      storage), reached over SSH like real servers;
#   2. WAL archiving on the primary (playbooks/setup_archiving.yml) and a verified base backup
#      (playbooks/take_base_backup.yml);
#   3. an application writes rows, each saying when it was written; we note a moment between
#      two of them; later someone deletes every row by mistake;
#   4. the restore host gets a copy of the primary as of that moment
#      (playbooks/pitr_restore.yml), and the demo proves it: the rows written before the
#      moment are there, the rows written after it are not, and the primary was not touched.
#
# Everything is removed at the end (PITR_DEMO_KEEP=1 keeps it and says how to remove it).
# Full Ansible output of each step is kept in a log directory, named at the end.
#
# Environment: PITR_DEMO_KEEP=1 keep the containers; PITR_DEMO_KEEP_LOGS=1 keep the log
# directory (with each playbook's JSON output, task timings included) also when the demo
# succeeds; PITR_DEMO_SUBNET (default 10.89.210)
# the /24 of the demo's podman network; CONTAINERS_CONF podman settings (default: the
# repository's tests/containers/containers.conf).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=tools/collection-env.sh
. "$root/tools/collection-env.sh"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$root/tests/containers/containers.conf}"
export ANSIBLE_NOCOLOR=1 ANSIBLE_STDOUT_CALLBACK=ansible.posix.json ANSIBLE_HOST_KEY_CHECKING=False

image=localhost/pitr-pg:15
network=pitr-demo
volume=pitr-demo-repository
subnet=${PITR_DEMO_SUBNET:-10.89.210}
primary=pitr-demo-primary
restore=pitr-demo-restore
primary_ip=$subnet.10
restore_ip=$subnet.20
repository=/srv/pitr/repository
work=$(mktemp -d /tmp/pitr-demo.XXXXXX)
started=$SECONDS

# -------------------------------------------------------------------------------------------
# Output

bold=$'\e[1m' dim=$'\e[2m' green=$'\e[32m' red=$'\e[31m' reset=$'\e[0m'
if [[ ! -t 1 ]]; then bold='' dim='' green='' red='' reset=''; fi
step_no=0
step_started=$SECONDS
step() {
  step_no=$((step_no + 1))
  step_started=$SECONDS
  printf '\n%s%d. %s%s\n' "$bold" "$step_no" "$*" "$reset"
}
say() { printf '   %s\n' "$*"; }
took() { printf '   %s(%d s)%s\n' "$dim" $((SECONDS - step_started)) "$reset"; }
fail() {
  printf '\n%sThe demo failed: %s%s\n' "$red" "$*" "$reset" >&2
  exit 1
}

# -------------------------------------------------------------------------------------------
# Clean-up

cleanup() {
  local status=$?
  if [[ ${PITR_DEMO_KEEP:-0} == 1 ]]; then
    printf '\nKept the demo running (PITR_DEMO_KEEP=1). Look around:\n'
    printf '  podman exec -it -u postgres %s psql        # the primary\n' "$primary"
    printf '  podman exec -it -u postgres %s psql        # the restored copy\n' "$restore"
    printf '  ansible-playbook -i %s/inventory.ini ...   # the same inventory\n' "$work"
    printf 'Remove it with:\n  podman rm -f %s %s && podman volume rm %s && podman network rm %s && rm -rf %s\n' \
      "$primary" "$restore" "$volume" "$network" "$work"
    return
  fi
  podman rm --force --ignore --time 10 "$primary" "$restore" >/dev/null 2>&1 || true
  podman volume rm --force "$volume" >/dev/null 2>&1 || true
  podman network rm --force "$network" >/dev/null 2>&1 || true
  if [[ $status -eq 0 && ${PITR_DEMO_KEEP_LOGS:-0} != 1 ]]; then
    rm -rf "$work"
    printf '\nRemoved the containers, the volume and the network.\n'
  elif [[ $status -eq 0 ]]; then
    printf '\nRemoved the containers, the volume and the network. Logs kept in %s\n' "$work"
  else
    printf '\nRemoved the containers, the volume and the network. Logs kept in %s\n' "$work" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -------------------------------------------------------------------------------------------
# Helpers

# sql CONTAINER QUERY: one psql call as postgres, unaligned, no headers.
sql() {
  podman exec -u postgres "$1" psql -X -q -A -t -v ON_ERROR_STOP=1 -d postgres -c "$2"
}

# playbook NAME LOG_STEM [ansible-playbook args...]: run a playbook of this collection, keep
# its JSON output, and print what the roles report (their debug messages), or the failure.
playbook() {
  local name=$1 stem=$2
  shift 2
  local log=$work/$stem.json status=0
  ansible-playbook "$root/playbooks/$name.yml" -i "$work/inventory.ini" "$@" >"$log" 2>"$work/$stem.stderr" ||
    status=$?
  summarize "$log" "$status" || true
  [[ $status -eq 0 ]] || fail "ansible-playbook playbooks/$name.yml exited $status (output: $log)"
}

# summarize JSON_LOG STATUS: the messages the roles print for people, one line each; on failure
# the failed tasks and their messages.
summarize() {
  python3 - "$1" "$2" <<'EOF'
import json
import sys
import textwrap

log, status = sys.argv[1], int(sys.argv[2])
try:
    with open(log, encoding="utf-8") as fh:
        run = json.load(fh)
except (OSError, ValueError):
    print(f"   (no readable output in {log})")
    sys.exit(0)
# The roles' own reports, by the task names they print them with (not the plan's settings:
# the steps say the same in words).
wanted = ("Report the proof", "Report the backup taken", "Report why no backup was taken",
          "Show the plan", "Say what was done")
for play in run.get("plays", []):
    for task in play.get("tasks", []):
        name = task["task"]["name"]
        for host, result in task.get("hosts", {}).items():
            if result.get("failed") and not result.get("skipped"):
                print(f"   FAILED on {host}: {name}")
                print(textwrap.indent(textwrap.fill(str(result.get("msg", "")), 96), "     "))
            elif name.endswith(wanted) and "msg" in result:
                msgs = result["msg"] if isinstance(result["msg"], list) else [result["msg"]]
                for msg in msgs:
                    msg = " ".join(str(msg).split())
                    if msg.startswith("Settings:"):
                        continue
                    print(textwrap.fill(msg, 96, initial_indent="   | ", subsequent_indent="   |   "))
EOF
}

wait_for_ssh() {
  local ip=$1 deadline=$((SECONDS + 60))
  until ssh -i "$work/id_ed25519" -o BatchMode=yes -o StrictHostKeyChecking=no \
    -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=3 "root@$ip" true 2>/dev/null; do
    ((SECONDS < deadline)) || fail "no SSH to $ip after 60 s"
    sleep 1
  done
}

# -------------------------------------------------------------------------------------------

printf '%sPoint-in-time recovery with pitr.postgresql, end to end%s\n' "$bold" "$reset"
printf '%sLogs of this run (kept if it fails): %s%s\n' "$dim" "$work" "$reset"

step "Two servers: a primary and a restore host (Debian 12, PostgreSQL 15, systemd)"
bash "$root/tests/containers/build-images.sh" 15 2>&1 | sed 's/^/   /' | grep -v '^   REPOSITORY\|^   localhost/' || true
podman image exists "$image" || fail "no image $image (tests/containers/build-images.sh failed)"
# Leftovers of an interrupted demo would stand in the way.
podman rm --force --ignore --time 5 "$primary" "$restore" >/dev/null 2>&1 || true
podman volume rm --force "$volume" >/dev/null 2>&1 || true
podman network rm --force "$network" >/dev/null 2>&1 || true
podman network create --subnet "$subnet.0/24" "$network" >/dev/null
podman volume create "$volume" >/dev/null
for spec in "$primary:$primary_ip" "$restore:$restore_ip"; do
  podman run -d --name "${spec%%:*}" --hostname "${spec%%:*}" --network "$network" --ip "${spec##*:}" \
    --systemd=always --volume "$volume:$repository" "$image" >/dev/null 2>>"$work/podman.stderr"
done
ssh-keygen -q -t ed25519 -N '' -C pitr-demo -f "$work/id_ed25519"
for name in "$primary" "$restore"; do
  state=$(podman exec "$name" timeout 180 systemctl is-system-running --wait 2>>"$work/podman.stderr" || true)
  [[ $state == running || $state == degraded ]] || fail "$name did not boot (systemd: $state)"
  podman exec -i "$name" sh -c 'umask 077 && mkdir -p /root/.ssh && cat > /root/.ssh/authorized_keys' \
    <"$work/id_ed25519.pub"
  # A real server has package lists; the images ship none (the roles install packages).
  podman exec "$name" apt-get update -qq >/dev/null 2>&1 || fail "apt-get update failed in $name"
done
wait_for_ssh "$primary_ip"
wait_for_ssh "$restore_ip"
cat >"$work/inventory.ini" <<EOF
[postgresql]
$primary ansible_host=$primary_ip

[restore_hosts]
$restore ansible_host=$restore_ip

[all:vars]
ansible_user=root
ansible_ssh_private_key_file=$work/id_ed25519
ansible_ssh_common_args=-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR
ansible_pipelining=true
ansible_python_interpreter=/usr/bin/python3
pitr_repository_path=$repository
EOF
say "$primary ($primary_ip) and $restore ($restore_ip), on the podman network $network"
say "both mount the volume $volume at $repository: the repository, as network storage would be"
say "Ansible reaches them over SSH; the inventory: $work/inventory.ini"
took

step "WAL archiving on the primary: ansible-playbook playbooks/setup_archiving.yml"
playbook setup_archiving 1-setup-archiving
took

step "A verified base backup: ansible-playbook playbooks/take_base_backup.yml"
playbook take_base_backup 2-take-base-backup
took

step "The application writes orders, one every 3 seconds; each row says when it was written"
sql "$primary" "CREATE TABLE orders (id int PRIMARY KEY, item text NOT NULL,
  written_at timestamptz NOT NULL DEFAULT clock_timestamp())" >/dev/null
utc="to_char(written_at AT TIME ZONE 'UTC', 'HH24:MI:SS.MS') || ' UTC'"
items=("" "a bicycle" "a kettle" "two chairs" "a lamp" "a rug")
target=""
for id in 1 2 3 4 5; do
  line=$(sql "$primary" "INSERT INTO orders (id, item) VALUES ($id, '${items[$id]}')
    RETURNING 'order ' || id || ' (' || item || ') written at ' || $utc")
  say "$line"
  if [[ $id -eq 3 ]]; then
    sleep 1.5
    target=$(sql "$primary" "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'")
    say "${bold}the moment to come back to: ${target#* } (after order 3, before order 4)${reset}"
    sleep 1.5
  elif [[ $id -lt 5 ]]; then
    sleep 3
  fi
done
sleep 2
deleted=$(sql "$primary" "WITH d AS (DELETE FROM orders RETURNING 1) SELECT count(*) FROM d")
mistake_at=$(sql "$primary" "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'HH24:MI:SS.MS') || ' UTC'")
say "${red}$mistake_at: oops, DELETE FROM orders - all $deleted rows are gone on the primary${reset}"
# archive_timeout (60 s) would send the newest WAL to the repository within a minute; the demo
# does not wait: it completes the segment and waits until it is archived.
segment=$(sql "$primary" "SELECT pg_walfile_name(pg_switch_wal())")
deadline=$((SECONDS + 60))
until [[ $(sql "$primary" "SELECT coalesce(last_archived_wal, '') >= '$segment' FROM pg_stat_archiver") == t ]]; do
  ((SECONDS < deadline)) || fail "WAL segment $segment was not archived within 60 s"
  sleep 1
done
say "the WAL up to now is in the repository (segment $segment archived)"
took

step "The restore host gets the pitr-wal command it restores WAL with: playbooks/install_host_command.yml"
say "${dim}ansible-playbook playbooks/install_host_command.yml -e pitr_hosts=restore_hosts${reset}"
playbook install_host_command 3-install-host-command -e pitr_hosts=restore_hosts
# The restore refuses a data directory that holds another cluster: clear the empty one the
# Debian package created.
podman exec "$restore" systemctl stop postgresql@15-main
podman exec "$restore" rm -rf /var/lib/postgresql/15/main
say "and its own empty cluster (made by the Debian package) is cleared away"
took

step "Restore a copy of the primary on the restore host, as of ${target#* }: playbooks/pitr_restore.yml"
say "${dim}ansible-playbook playbooks/pitr_restore.yml -l $restore -e pitr_hosts=restore_hosts -e target_time='$target'${reset}"
say "${dim}  + pitr_restore_clone=true (a copy never archives into the primary's repository)${reset}"
playbook pitr_restore 4-pitr-restore -l "$restore" -e target_time="'$target'" \
  -e '{"pitr_hosts": "restore_hosts", "pitr_restore_clone": true, "pitr_restore_clone_port": 5432,
       "pitr_restore_service_name": "postgresql@15-main", "pitr_restore_progress_interval": 5}'
took

step "The proof"
rows=$(sql "$restore" "SELECT id || '|' || item || '|' || $utc FROM orders ORDER BY id")
say "orders on the restored copy (restore host), restored to ${target#* }:"
present=()
while IFS='|' read -r id item at; do
  [[ -n $id ]] || continue
  present+=("$id")
  say "  ${green}present${reset}  order $id ($item), written at $at"
done <<<"$rows"
for id in 4 5; do
  if [[ " ${present[*]} " != *" $id "* ]]; then
    say "  ${green}absent${reset}   order $id (${items[$id]}), written after the moment"
  fi
done
on_primary=$(sql "$primary" "SELECT count(*) FROM orders")
in_recovery=$(sql "$restore" "SELECT pg_is_in_recovery()")
timeline=$(sql "$restore" "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int")
say "the copy is out of recovery ($([[ $in_recovery == f ]] && echo yes || echo NO)), on timeline $timeline, and writable:"
say "  $(sql "$restore" "INSERT INTO orders (id, item) VALUES (6, 'a new order on the copy')
  RETURNING 'order ' || id || ' (' || item || ') written at ' || $utc")"
say "the primary was not touched: it still has $on_primary orders (the mistake is still there)"
if [[ "${present[*]}" == "1 2 3" && $in_recovery == f && $on_primary == 0 ]]; then
  printf '\n%sPROOF: orders 1-3, written before %s, are back; orders 4-5, written after it, are not.%s\n' \
    "$green$bold" "${target#* }" "$reset"
else
  fail "expected orders 1 2 3 on the copy (got: ${present[*]:-none}), out of recovery, primary untouched"
fi
printf '%sThe whole demo took %d s.%s\n' "$dim" $((SECONDS - started)) "$reset"
