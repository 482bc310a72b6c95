# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Offline stand-in for the get-pip script that ansible-test downloads.

ansible-test bootstraps pip in each of its virtual environments with a ``get-pip`` script it
fetches from a site this machine cannot reach. It first looks for a cached copy at
``~/.ansible/test/cache/get_pip_<version>.py``; ``make sanity`` copies this file there.

It does what get-pip does with the arguments ansible-test passes (for example
``--disable-pip-version-check pip==24.2 --no-setuptools --no-wheel``): put pip into the running
interpreter's environment with ``ensurepip``, then let that pip install the requested packages
from the package index. ``--no-setuptools`` and ``--no-wheel`` are get-pip options, not pip
options: they are taken out, and setuptools, which ``ensurepip`` brings along on Python < 3.12,
is removed again when ``--no-setuptools`` asks for an environment without it.
"""

from __future__ import annotations

import ensurepip
import subprocess
import sys

GET_PIP_ONLY_OPTIONS = ("--no-setuptools", "--no-wheel")


def pip(*args: str) -> None:
    """Run pip of the running interpreter; stop with its exit code if it fails."""
    completed = subprocess.run([sys.executable, "-m", "pip", *args], check=False)
    if completed.returncode != 0:
        sys.exit(completed.returncode)


def main(argv: list[str]) -> None:
    """Bootstrap pip, then install what the get-pip command line asked for."""
    pip_args = [arg for arg in argv if arg not in GET_PIP_ONLY_OPTIONS]
    ensurepip.bootstrap()
    pip("install", "--upgrade", *pip_args)
    if "--no-setuptools" in argv and not any(arg.startswith("setuptools") for arg in pip_args):
        pip("uninstall", "--yes", "--quiet", "setuptools")


if __name__ == "__main__":
    main(sys.argv[1:])
