# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Write marker rows with known commit times while pgbench loads the server.

Runs on a database host as the PostgreSQL OS user (peer authentication on the socket), with
the distribution's python3 and psycopg. Used by the pitr_e2e and failures molecule scenarios
and by tools/demo.sh.

Each marker is one autocommitted INSERT into pitr_markers (id, note, written_at). written_at is
clock_timestamp() inside the INSERT, so the commit comes after it; committed_by is read right
after the commit returned, so the commit comes before it. A target time between marker k's
committed_by and marker k+1's written_at therefore lies strictly between the two commits,
whatever else commits meanwhile. The gap between markers makes that interval wide.

Afterwards the WAL holding the markers is switched out and the script waits until it is
archived, so that every marker is in the archive. The result (JSON) goes to --out and stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import psycopg

# A timestamptz as UTC text with all six fractional digits: "2026-11-25 10:30:00.120000+00".
# The same expression reads the markers back (shared/tasks/read_server_state.yml).
UTC_TEXT = "to_char((%s) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--major", required=True, help="PostgreSQL major version (pgbench path)")
    parser.add_argument("--out", required=True, help="where to write the JSON record")
    parser.add_argument("--count", type=int, default=6, help="markers to write")
    parser.add_argument("--gap", type=float, default=2.0, help="seconds between markers")
    parser.add_argument(
        "--target-after",
        type=int,
        default=3,
        help="the target lies between this marker and the next one",
    )
    parser.add_argument(
        "--restore-point",
        default="",
        help="also create this restore point right after the --target-after marker",
    )
    parser.add_argument("--pgbench-rate", type=int, default=50, help="pgbench transactions/s")
    parser.add_argument("--archive-timeout", type=float, default=120.0)
    args = parser.parse_args()

    conn = psycopg.connect("dbname=postgres", autocommit=True)
    conn.execute("SET TIME ZONE 'UTC'")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS pitr_markers ("
        " id int PRIMARY KEY, note text NOT NULL, written_at timestamptz NOT NULL)"
    )

    pgbench = f"/usr/lib/postgresql/{args.major}/bin/pgbench"
    subprocess.run(
        [pgbench, "-i", "-s", "2", "-q", "postgres"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Load while the markers are written: about count * gap seconds, plus a margin.
    duration = int(args.count * args.gap) + 4
    load = subprocess.Popen(
        [
            pgbench,
            "-n",
            "-c",
            "2",
            "-j",
            "1",
            "-R",
            str(args.pgbench_rate),
            "-T",
            str(duration),
            "postgres",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(1)

    markers = []
    restore_point_lsn = None
    for i in range(1, args.count + 1):
        (written_at,) = conn.execute(
            "INSERT INTO pitr_markers VALUES (%s, %s, clock_timestamp())"
            f" RETURNING {UTC_TEXT % 'written_at'}",
            (i, f"marker {i}"),
        ).fetchone()
        (committed_by,) = conn.execute(f"SELECT {UTC_TEXT % 'clock_timestamp()'}").fetchone()
        markers.append({"id": i, "written_at": written_at, "committed_by": committed_by})
        if args.restore_point and i == args.target_after:
            (restore_point_lsn,) = conn.execute(
                "SELECT pg_create_restore_point(%s)::text", (args.restore_point,)
            ).fetchone()
        if i < args.count:
            time.sleep(args.gap)

    out = load.communicate(timeout=duration + 120)[0]
    tps = [line for line in out.splitlines() if line.startswith("tps")]

    k = args.target_after
    (target_time,) = conn.execute(
        "SELECT " + UTC_TEXT % "(%s::timestamptz + (%s::timestamptz - %s::timestamptz) / 2)",
        (markers[k - 1]["committed_by"], markers[k]["written_at"], markers[k - 1]["committed_by"]),
    ).fetchone()

    # Complete the segment holding the markers and wait until it is archived.
    (segment,) = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
    deadline = time.monotonic() + args.archive_timeout
    while True:
        (last,) = conn.execute(
            "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver"
        ).fetchone()
        if last >= segment:
            break
        if time.monotonic() > deadline:
            print(f"segment {segment} not archived after {args.archive_timeout} s", file=sys.stderr)
            return 1
        time.sleep(0.5)

    (system_identifier,) = conn.execute(
        "SELECT system_identifier::text FROM pg_control_system()"
    ).fetchone()
    record = {
        "markers": markers,
        "target_after": k,
        "target_time": target_time,
        "expected_ids": list(range(1, k + 1)),
        "all_ids": list(range(1, args.count + 1)),
        "restore_point": args.restore_point or None,
        "restore_point_lsn": restore_point_lsn,
        "archived_segment": segment,
        "system_identifier": system_identifier,
        "pgbench": tps[0] if tps else out.strip()[-200:],
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=2)
    os.replace(tmp, args.out)
    json.dump(record, sys.stdout, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
