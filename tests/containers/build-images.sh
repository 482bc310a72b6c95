#!/usr/bin/env bash
# Build the podman images the container tests and the molecule scenarios run on:
#
#   localhost/pitr-pg:15   Debian 12 bookworm, PostgreSQL 15
#   localhost/pitr-pg:17   Debian 13 trixie,   PostgreSQL 17
#
# Both boot systemd as PID 1 (podman run --systemd=always) and come up with the distribution's
# postgresql@<major>-main unit running, python3 at /usr/bin/python3 for Ansible, and LANG=C.UTF-8.
# No registry is needed: the root file systems are made with debootstrap from the Debian mirror
# apt already uses, then imported.
#
# Cached: each image carries the label pitr.definition=<hash of its definition> (suite, package
# list, the customisation function below). An image whose label matches is kept as it is; change
# the definition, or pass --force, to rebuild. Downloaded packages are kept in the cache directory
# so a rebuild does not fetch them again. Images of earlier definitions stay (untagged) and are
# reused if the definition comes back; remove them with
#   podman image prune --filter label=pitr.definition
#
# Usage: tests/containers/build-images.sh [--force] [--jobs 1] [15|17 ...]
#   --force    rebuild even if the image is up to date
#   --jobs 1   build one image after the other (default: all at once, which is never slower here)
# Environment:
#   PITR_IMAGE_CACHE     cache directory (default /var/cache/pitr-postgresql/images)
#   PITR_DEBIAN_MIRROR   Debian mirror URI (default: the one in apt's sources)
#   CONTAINERS_CONF      podman settings (default: containers.conf beside this script)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
cache=${PITR_IMAGE_CACHE:-/var/cache/pitr-postgresql/images}
image_repo=localhost/pitr-pg

# major version -> Debian suite that ships it
declare -A suite_of=([15]=bookworm [17]=trixie)

# Every package exists under this name in bookworm and in trixie. No postgresql-contrib: the
# contrib modules (amcheck, pg_stat_statements...) are in the server package since PostgreSQL 10,
# and trixie only has postgresql-contrib as a virtual package. python3-apt and acl are for
# Ansible (apt module; become_user to an unprivileged user such as postgres); dbus lets
# hostnamectl/timedatectl/logind work under systemd. debootstrap does not resolve virtual packages:
# python3-cffi-backend is named because python3-zstandard depends on the virtual
# python3-cffi-backend-api-min/-max it provides.
packages=(
  python3 python3-apt python3-psycopg python3-zstandard python3-cffi-backend python3-lz4
  zstd lz4 sudo acl
  postgresql
  procps iproute2 systemd systemd-sysv dbus
  openssh-server openssh-client rsync locales
)

log() { printf '%s build-images: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

# customize_rootfs ROOTFS MAJOR SUITE MIRROR: runs on the host against the debootstrapped tree.
# Its text is part of the image definition hash: editing it rebuilds the images.
customize_rootfs() {
  local rootfs=$1 major=$2 suite=$3 mirror=$4

  # apt inside the container uses the same mirror (roles may install packages).
  rm -f "$rootfs/etc/apt/sources.list.d/"*.sources
  printf 'deb %s %s main\ndeb %s %s-updates main\n' "$mirror" "$suite" "$mirror" "$suite" \
    >"$rootfs/etc/apt/sources.list"

  # C.UTF-8 is built into glibc; make it the system locale. Debian's systemd reads
  # /etc/locale.conf, Debian's tools /etc/default/locale: one file, one link.
  printf 'LANG=C.UTF-8\n' >"$rootfs/etc/default/locale"
  ln -sfn default/locale "$rootfs/etc/locale.conf"

  # The cluster that postgresql-common created during debootstrap got whatever locale the build
  # environment had; make it a C.UTF-8 cluster, as on a freshly installed server.
  chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    sh -ec "pg_dropcluster $major main; pg_createcluster --locale C.UTF-8 $major main >/dev/null"

  # Each container gets its own identity: an empty machine-id is filled at boot (without
  # counting as a first boot), SSH host keys are generated on first start.
  : >"$rootfs/etc/machine-id"
  rm -f "$rootfs/var/lib/dbus/machine-id" "$rootfs/etc/ssh/ssh_host_"*
  mkdir -p "$rootfs/etc/systemd/system/ssh.service.d"
  printf '%s\n' '[Service]' 'ExecStartPre=' 'ExecStartPre=/usr/bin/ssh-keygen -A' \
    'ExecStartPre=/usr/sbin/sshd -t' >"$rootfs/etc/systemd/system/ssh.service.d/10-host-keys.conf"

  # No unit needs masking: with podman --systemd=always both suites' systemd skip what cannot run
  # in a container (udev, sysctl, remount-fs, gettys) by their own conditions and reach "running".

  # podman provides these per container.
  rm -f "$rootfs/etc/hostname" "$rootfs/etc/resolv.conf"

  # Smaller image: no documentation or message translations (now or from later installs), no
  # package lists or downloaded packages (run apt-get update before installing).
  printf '%s\n' 'path-exclude=/usr/share/doc/*' 'path-exclude=/usr/share/man/*' \
    'path-exclude=/usr/share/info/*' 'path-exclude=/usr/share/locale/*/LC_MESSAGES/*.mo' \
    >"$rootfs/etc/dpkg/dpkg.cfg.d/01-pitr-nodoc"
  rm -rf "$rootfs/usr/share/doc/"* "$rootfs/usr/share/man/"* "$rootfs/usr/share/info/"*
  find "$rootfs/usr/share/locale" -name '*.mo' -path '*/LC_MESSAGES/*' -delete
  rm -rf "$rootfs/var/lib/apt/lists/"* "$rootfs/var/cache/apt/"*.bin "$rootfs/var/cache/apt/archives/"*.deb
}

definition_hash() {
  local major=$1
  {
    echo "format 1"
    echo "major $major suite ${suite_of[$major]} variant minbase"
    echo "packages ${packages[*]}"
    declare -f customize_rootfs
  } | sha256sum | cut -c1-16
}

ensure_tools() {
  local missing=() cmd
  for cmd in podman runc debootstrap newuidmap fuse-overlayfs; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; install as root: apt-get install -y podman runc debootstrap uidmap fuse-overlayfs"
  log "installing podman runc debootstrap uidmap fuse-overlayfs (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq podman runc debootstrap uidmap fuse-overlayfs >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq podman runc debootstrap uidmap fuse-overlayfs >/dev/null
  fi
}

# The URI of the first Debian (non-security) "deb" source apt uses.
debian_mirror() {
  if [[ -n ${PITR_DEBIAN_MIRROR:-} ]]; then
    echo "$PITR_DEBIAN_MIRROR"
    return
  fi
  local uri=""
  if [[ -r /etc/apt/sources.list.d/debian.sources ]]; then
    # deb822: stanzas separated by blank lines; take URIs of a "deb" stanza whose suites are not
    # the security suites.
    uri=$(awk '
      BEGIN { RS = ""; FS = "\n" }
      {
        types = ""; uris = ""; suites = ""
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^Types:/)  types = $i
          if ($i ~ /^URIs:/)   uris = $i
          if ($i ~ /^Suites:/) suites = $i
        }
        if (types ~ /[ \t]deb([ \t]|$)/ && suites !~ /-security/ && uris != "") {
          sub(/^URIs:[ \t]*/, "", uris); split(uris, u, /[ \t]+/); print u[1]; exit
        }
      }' /etc/apt/sources.list.d/debian.sources)
  fi
  if [[ -z $uri && -r /etc/apt/sources.list ]]; then
    uri=$(awk '
      $1 == "deb" && $0 !~ /security/ {
        i = 2
        if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
        print $i; exit
      }' /etc/apt/sources.list)
  fi
  [[ $uri =~ ^https?:// ]] || die "no Debian mirror found in apt's sources; set PITR_DEBIAN_MIRROR"
  echo "${uri%/}"
}

image_label() { # IMAGE -> value of pitr.definition, or nothing
  podman image inspect --format '{{ index .Labels "pitr.definition" }}' "$1" 2>/dev/null || true
}

# build_image MAJOR HASH MIRROR: debootstrap, customise, import. Output goes to the caller's log.
build_image() {
  local major=$1 hash=$2 mirror=$3 suite=${suite_of[$1]}
  local rootfs="$cache/rootfs-$suite" debs="$cache/debs-$suite"
  local tag="$image_repo:$major"
  # --one-file-system: a build that died inside debootstrap may have left /proc or /sys mounted
  # in the tree; never delete through a mount.
  rm -rf --one-file-system "$rootfs"
  mkdir -p "$rootfs" "$debs"
  local include
  include=$(IFS=,; echo "${packages[*]}")
  echo "debootstrap $suite from $mirror"
  LANG=C.UTF-8 LC_ALL=C.UTF-8 debootstrap --variant=minbase --include="$include" \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg --cache-dir="$debs" \
    "$suite" "$rootfs" "$mirror"
  # Fail here, not in a test: the suite must ship the major version this tag promises.
  [[ -x $rootfs/usr/lib/postgresql/$major/bin/postgres ]] ||
    { echo "$suite does not ship PostgreSQL $major"; return 1; }
  [[ -x $rootfs/usr/bin/python3 ]] || { echo "no /usr/bin/python3 in $suite rootfs"; return 1; }
  echo "customising"
  customize_rootfs "$rootfs" "$major" "$suite" "$mirror"
  echo "importing as $tag"
  tar -C "$rootfs" --numeric-owner -cf - . |
    podman import \
      --change 'CMD=["/lib/systemd/systemd"]' \
      --change 'ENV LANG=C.UTF-8' \
      --change "LABEL pitr.definition=$hash" \
      --change "LABEL pitr.postgresql.major=$major" \
      --change "LABEL pitr.debian.suite=$suite" \
      --message "pitr.postgresql test image: Debian $suite, PostgreSQL $major" \
      - "$tag"
  rm -rf --one-file-system "$rootfs"
}

main() {
  local force=0 jobs=2 majors=()
  while [[ $# -gt 0 ]]; do
    case $1 in
      --force) force=1 ;;
      --jobs) jobs=${2:?--jobs needs a number}; shift ;;
      -h | --help) usage; return 0 ;;
      15 | 17) majors+=("$1") ;;
      *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
  done
  [[ ${#majors[@]} -gt 0 ]] || majors=(15 17)

  ensure_tools
  podman info >/dev/null || die "podman does not work here (CONTAINERS_CONF=$CONTAINERS_CONF)"
  mkdir -p "$cache"
  # Another run (another engineer, another test) may be building right now: wait for it, it
  # probably builds what we need.
  exec 9>"$cache/.lock"
  flock -w 1800 9 || die "timed out waiting for the lock on $cache"

  local todo=() major hash existing
  declare -A hash_of=()
  for major in "${majors[@]}"; do
    hash=$(definition_hash "$major")
    hash_of[$major]=$hash
    if [[ $force -eq 0 && $(image_label "$image_repo:$major") == "$hash" ]]; then
      log "$image_repo:$major is up to date (pitr.definition=$hash)"
      continue
    fi
    # An image with this definition may exist under no tag or another tag: reuse it.
    existing=$(podman images -q --filter "label=pitr.definition=$hash" | head -n 1)
    if [[ $force -eq 0 && -n $existing ]]; then
      podman tag "$existing" "$image_repo:$major"
      log "$image_repo:$major tagged from existing image $existing (pitr.definition=$hash)"
      continue
    fi
    todo+=("$major")
  done
  [[ ${#todo[@]} -gt 0 ]] || return 0

  local mirror
  mirror=$(debian_mirror)
  # Each build runs in the background with its own log; with --jobs 1 one after the other.
  local -A pid_of=()
  local failed=0
  for major in "${todo[@]}"; do
    log "building $image_repo:$major (Debian ${suite_of[$major]}), log: $cache/build-$major.log"
    rm -f "$cache/build-$major.seconds"
    (
      start=$SECONDS
      build_image "$major" "${hash_of[$major]}" "$mirror"
      echo "$((SECONDS - start))" >"$cache/build-$major.seconds"
    ) >"$cache/build-$major.log" 2>&1 &
    pid_of[$major]=$!
    if [[ $jobs -le 1 ]]; then
      wait "${pid_of[$major]}" || failed=1
    fi
  done
  for major in "${todo[@]}"; do
    if [[ $jobs -gt 1 ]]; then
      wait "${pid_of[$major]}" || failed=1
    fi
    if [[ -s $cache/build-$major.seconds && $(image_label "$image_repo:$major") == "${hash_of[$major]}" ]]; then
      log "built $image_repo:$major in $(cat "$cache/build-$major.seconds") s"
    else
      failed=1
      log "building $image_repo:$major FAILED; last lines of $cache/build-$major.log:"
      tail -n 25 "$cache/build-$major.log" >&2
    fi
  done
  [[ $failed -eq 0 ]] || die "image build failed"
  # A forced rebuild leaves the previous image of the same definition untagged: no use to anyone.
  for major in "${todo[@]}"; do
    podman images -q --filter dangling=true --filter "label=pitr.definition=${hash_of[$major]}" |
      xargs -r podman rmi >/dev/null 2>&1 || true
  done
  podman images --filter "reference=$image_repo" >&2
}

main "$@"
