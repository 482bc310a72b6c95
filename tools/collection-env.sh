# shellcheck shell=bash
# Source this from scripts (or a shell) that run Ansible outside the checkout's root:
#   . "$(dirname "$0")/collection-env.sh"
# It puts .venv first on PATH and points Ansible at this checkout as pitr.postgresql.
# `make bootstrap` must have run (it makes .venv and the build/collections link).
PITR_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PITR_ROOT
export PATH="$PITR_ROOT/.venv/bin:$PATH"
export ANSIBLE_CONFIG="$PITR_ROOT/ansible.cfg"
export ANSIBLE_COLLECTIONS_PATH="$PITR_ROOT/build/collections"
