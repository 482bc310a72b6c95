# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The collection's version, as installed on hosts next to the host command."""

from __future__ import annotations

VERSION = "0.1.0"
