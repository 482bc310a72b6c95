# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Real WAL material recorded from PostgreSQL 15.x (Debian 12, x86_64), kept small.

Recorded from scratch clusters (``initdb --data-checksums``, ``wal_level = replica``,
``archive_mode = on``, ``archive_command = 'cp %p ARCHIVE/%f'``):

- cluster A (16 MiB segments, system identifier 7712112317818168995 per ``pg_controldata``):
  a table created, ``pg_switch_wal()``, ``pg_basebackup -X stream -R`` to a standby, more
  writes, ``pg_ctl promote`` of the standby. It archived 000000010000000000000001, ...02,
  the backup history file ...02.00000028.backup, and the standby archived
  000000010000000000000003.partial and 00000002.history at promotion.
- cluster B (``initdb --wal-segsize=1``: 1 MiB segments, system identifier
  7712112455010395308): 100000 rows inserted; archived segment 00000001000000000000000A.

Only the first 8 KiB page of each segment is kept (zlib + base64); a test that needs a whole
segment pads it with zeros (``full_segment``): the archive code reads only the long page
header. The expected header values in ``HEADERS`` were read off ``xxd`` dumps and
``pg_controldata``, not computed by the code under test.
"""

from __future__ import annotations

import base64
import zlib


def _unpack(*chunks: str) -> bytes:
    return zlib.decompress(base64.b64decode("".join(chunks)))


TL1_SEG1_PAGE = _unpack(
    "eNrt1TEOgjAUxvGvSFhccHPspqsjV/AEzia66OSik1zFxNnDeAYHJycPgIWWhGqiE4PJ/5c0pe+99kEIIb8mMmqE"
    "yTuv97f5I9s0cSvt9OlwLIpqMQ07TWfUBmHOJ3GsW1eVUugSqePezPrKtsvJje1zeNHIXbhcUmY+c0/donPEciWN"
    "6xKb2jZmTHSH5q2r0Xe/8up5v/68v3h+8P4B8P0DAAD+/wAAAAAA9OYFGTQTfA=="
)

TL1_SEG2_PAGE = _unpack(
    "eNrtz6EKwlAUxvGzgbK4aBTTjSIYBINZDDa1mSw2g76DyTdYsNhN4itYlA2GRqs+w7ybd3cbPoHw/8HHLh/3Hs78"
    "qyuOZFwp2S82z+G7vtRHR5oiHdO3d+vsuu+JdF+9W9KwT/rxMdIz0oR21sp8lZnv69xPapZM88YpJRXlb+dFd3F/"
    "742+21lRZf9WMSTrxzrB9vxIPFX503z92LQDnXByqAkAAAAAAAAAAAAAAH/kA238Hr4="
)

TL1_SEG3_PARTIAL_PAGE = _unpack(
    "eNrFmLlvE0EUxt/Yi4ljjoQrITgw4Qxnwl1QEClIIGgoOQowiQGL4Cz2BoIoYqRwX+a+wRL/QECCFpcIUQQpoqAB"
    "RImQKKi4zBt7184ObzH2op2RPs967Tfzm8/z3qxc9zoADPLND6Pao71HPm7+HDiAlww4QNT6lIFPdBnUscc/W6EO"
    "YJV/BPwDAYAxePOTVhrkhdbH0i0MRiDTDFzj4l4bjpC5v42By7YMXA/xz6394R229cETNuKz3/dBC7Agz+Vy6ws3"
    "OgAMl3PdqsFxOwrXtfk5CuOWWup56VpPFF1g3flOMFr3NIm3DVpS/sWCdyD//h3+Vvq+XcZRPVo1bwi1ESRes00U"
    "L9nGDaLfUie49AQv8sbz3SuTd6cFHdQKgzBzQKGBPyfoxM+DTN4T9vWtq82vL2lEjFjSiHVVu76lC+zTi3FFm5x/"
    "fdkp+sZQYX2zHNbXOXp9zGF9AE/Dhb7VzEeRZ9kdx7eLPBsMfy3l2Qccpt4M2nS4jw2GGXwFXbPyTH/I2fsHHPct"
    "Z9n7nLWjMvc4q0MNn+KsAzV0kjOOSp/gDFD6ILc5mrprf//lDme7UcO3MR41dAvjUemb+D2UfgPnvI5zorLXcE5U"
    "5irOiUpd4ezLZYxHDacxHjV0CeNR6YsYj9IvYPx5jEdlz2E8KnMW41GpMxh/GuNR9jyshwnQBKyGF9Mwn4eRPT3R"
    "3lh3tfu6ycoh+JYTfc5sLKab+VWyRuYZT/B0HYz0u6kLzUWe7xXzjCN4+l3yhIs8PyrmCZH+xOL/x5+fFfPUkv64"
    "4yn586tiniDlj1H9XhZthtkHkGQ0DyTL89QInqDkj8tzrsFk0Mx5R/sDEg8rnrcFnrUSjzhbvNzPMs8agsfL/Szz"
    "rCb98W4/yzyrKH883M8yz0qKZ39f/MCu7ogRqY6nvsjgt+1n+If9vMKRJxk95Dq/fBXn13JHHnfnaaX5zkyedoln"
    "akiNPxZPmyOPt/5YO2+ZxDMl5O3zj8yzlODx8vlH5llC8Kg4LyyexaQ/3p8XFs8i0h/vzwuLZyHlj4LzwuJppXgU"
    "nBdW5AJHHm/rocUz35FHTT2cJ/G8aVBbD+cSPCrr4RyCR2U9nE36o64etpD+qKuHnPJHYT2cRfAkE8m+PT3Jqj26"
    "Nq7AUAOaPd+7y+f7TCce8c9flX9tTjIZGNjrM+sq708zyZOI9rj4yZr+Up/L8YSd/PkvPKxinhkSz4ji+txE8Kis"
    "z9MJHpX1uZH0R119biD9UVefp1H+KKzPkwgezPau3ng8Ft/bWxXP9CJDSHpe7bfxPPP/yTNW4nmrON8DBI/KfB9D"
    "8KjMd430R12++0l/1OW7j/JHYb4zgkdPRAwjkSw37W8Sa8gR"
)

SEG1M_0A_PAGE = _unpack(
    "eNp92QlQznkcx/E/rShFrJuWGcfa3cGszRR2rRnZaMasRcoVufIoOYrShQ6lopRO6dCFUpIOSZSiUina5FrbtmHb"
    "bbPWvXbbT8vO/7vfmf3+Z57nmef/zGvmec888/wug/qeSjel60r453m08vbKSC5t2NiubacoBooyCjdG6Sq7tBWl"
    "R9eHMxXFGS+dWpC9hig2GkVZ+M5Nx6Ohu6I86ox/e0NXUUy6X/eV/Gr4RczPf/d9uvwPeg+tJL8G3oL5EOI7jCc9"
    "lfxa+MXM1xE/fcq6c5JfB2/JvEE31ZtqSoMlvx7eivcTH2Lnf1HytvBLeD/xu8bbR0h+A/xS3k98+sfjbkleA7+M"
    "93dXvdOzseslvxF+Oe8nPuHF5o8kbwe/gvcTf7I6Tfz92cNb837id9a2V0l+E/xK3q+l+k5Ln88k7wC/ivcT/4lF"
    "rbvkN8Pb8H7ifzsYd0fyW+BX837ix4Y1HJL8Vvg1vP891Y/wrPCQ/Db4tbyf+Ap3r8mSd4Rfx/uJLzczj5O8E/x6"
    "3k98v9lKveS3w9vy/h6qdxia1ir5HfAbeD/xhcPbT0jeGV7D+4m3sNJ5I3kX4I28n/g9S2flSH4nvB3v11a9te9M"
    "Pcm7wtvzfuID/HRnSd4NfhPvJ96vqLRD8u7wDryf+IXF/gmS94DfzPt7qt4tMbxO8p7wW3g/8VlJ9+Mlvwt+K+8n"
    "fnFzjZfkd8Nv4/3Ee7X41Uh+D7wj7++leme7FH/Je8E78X7ikzQdVyTvDb+d9xOfueBDO8n7wO/g/cS7zt80RvK+"
    "mrfv/9Ovo/oeelUGkt8L78L7ia/vs3ul5P3gd/J+4mfMW6sjeX94V95PfNvXE7+S/D54N96vq/opIRNeST4A3p33"
    "E98capsn+UB4D95P/C/Hs4ZJPgjek/cTb5LeaiH5/fC7eH9v1c8t9g6X/AH43byf+CNFlbclHwy/h/cTb+YSLY6/"
    "IfBevJ/4MNcb4vh7EN6b9+up/kTkNXH+EQrvw/uJ9wz3FecfYfC+vJ94x8x5JpI/BL+X9xOfltHTWfLh8H68X1/1"
    "TY8TxPErAt6f9xOv96RNHD8j4ffxfuJbsvsslXwUfADvJ944x3Sg5KPhA3l/H9U/sjcT5y8x8EG8n/jPHfTF+dNh"
    "+P28n/hPLcrnSj4W/gDvJ77VMlhb8kfgg3l/X9XXzAndIfk4Tdd6lfUTP9S8aark4+EP8n7irZ7ru0g+AT6U9xMf"
    "9NTMWPKJ8GG830D1BiXPJkn+KPwh3k982aULqySfBB/O+4mvfOlcLflk+AjeT7zh6y+8JZ8CH8n7+6l+dWpMvuRT"
    "4aN4P/F5yXUvJZ8GH837iV/y0ChT8sfgY3g/8ftbPZslfxz+MO/vr/oF0zysJX8CPpb3E7/XxLif5NPhj/B+4gO1"
    "Os9LPgM+jvcTv7Jb7hPJn4SP5/3vq/5W1N3eks/U/Lv7RvqJ14+JMJV8Fnwi7yf+pvXlFsmfgj/K+4nXWh6UIfls"
    "+CTeP0D107JDZkv+NHwy7yf+15zbupLPgU/h/cS3+PdPlfwZ+FTeT7xxgNVPks+FT+P9A1U/p7HznuTz4I/xfuJj"
    "G3JDJZ8Pf5z3E+8Y+U2Z5AvgT/B+4tPChwdK/ix8Ou8fpHoX8yFGki+Ez+D9xGfMWeAm+XPwJ3k/8YmOMTclXwSf"
    "yfuJ3761Lkry5+GzeP9g1a9wqHkk+WL4U7yf+H32fmmSvwCfzfuJ72t5ZqLkL8Kf5v3E37H4y0byJfA5vH+I6ife"
    "uyuun0vhz/B+4l/fjxDX75fgc3k/8S9+tBb3D8rg83g/8aMfDBD3L8rh83n/UNUvL8wpkvxl+ALeT7x/wavfJX8F"
    "/izvJ972D8MUyVfAF/J+4nNeWbZJvhL+HO8fpnr7cYvE9XMVfBHvJ75gzAfi+v0q/HneT3zuyEZx/6Aavpj3E29j"
    "GCvuX9TAX+D9w1Vv3vl4sORr4S/yfuLj/iwUz7+uwZfwfuJNp7Z1Sr4OvpT3Ex8yPeGU5OvhL/H+Eao/3li0RPLX"
    "4ct4P/EeDc8HSf4GfDnvJ35Lx4xCyTfAX+b9xCe3Oz2T/LfwV3i/Ifn/zL5RIvlG+AreT3zfnOgDkr8JX8n7if/+"
    "sUeT5Jvgq3g/8UZPjCMlfwv+Ku//QPU/TzAaL/nb8NW8n/gvJ3naSv4OfA3vJ37ygLyrkr8LX8v7iX8w6I2P5O/B"
    "X+P9I1Vfq9Msnj9/p+k6b2b9xA/rnS6eP9+Hr+f9xC/L93z9f/5vPu1DPg=="
)

PG_CONTROL_HEAD = _unpack("eNpbnFb+2OstW7YIKwODajkvDyMDBIQDxUC0BgMDCzLNBMUwdQBrwAbt")

# PostgreSQL copies the last segment of the old timeline into the first segment of the new one
# at promotion: the first 8 KiB of 000000020000000000000003 (recorded from the promoted standby's
# pg_wal) are byte-identical to 000000010000000000000003.partial, timeline 1 in its header.
TL2_SEG3_PAGE = TL1_SEG3_PARTIAL_PAGE

SYSID_A = 7712112317818168995
SYSID_B = 7712112455010395308
PG15_MAGIC = 0xD110

# name -> (first page, expected long header fields)
HEADERS = {
    "000000010000000000000001": (
        TL1_SEG1_PAGE,
        dict(
            magic=0xD110,
            info=0x0002,
            timeline=1,
            pageaddr=0x01000000,
            system_identifier=SYSID_A,
            segment_size=16 * 1024 * 1024,
            block_size=8192,
        ),
    ),
    "000000010000000000000002": (
        TL1_SEG2_PAGE,
        dict(
            magic=0xD110,
            info=0x0002,
            timeline=1,
            pageaddr=0x02000000,
            system_identifier=SYSID_A,
            segment_size=16 * 1024 * 1024,
            block_size=8192,
        ),
    ),
    "000000010000000000000003.partial": (
        TL1_SEG3_PARTIAL_PAGE,
        dict(
            magic=0xD110,
            info=0x0006,
            timeline=1,
            pageaddr=0x03000000,
            system_identifier=SYSID_A,
            segment_size=16 * 1024 * 1024,
            block_size=8192,
        ),
    ),
    "000000020000000000000003": (
        TL2_SEG3_PAGE,
        dict(
            magic=0xD110,
            info=0x0006,
            timeline=1,
            pageaddr=0x03000000,
            system_identifier=SYSID_A,
            segment_size=16 * 1024 * 1024,
            block_size=8192,
        ),
    ),
    "00000001000000000000000A": (
        SEG1M_0A_PAGE,
        dict(
            magic=0xD110,
            info=0x0007,
            timeline=1,
            pageaddr=0x00A00000,
            system_identifier=SYSID_B,
            segment_size=1024 * 1024,
            block_size=8192,
        ),
    ),
}

# The backup history file pg_basebackup left in the archive (all 338 bytes).
BACKUP_NAME = "000000010000000000000002.00000028.backup"
BACKUP_FILE = (
    b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
    b"STOP WAL LOCATION: 0/2000100 (file 000000010000000000000002)\n"
    b"CHECKPOINT LOCATION: 0/2000060\n"
    b"BACKUP METHOD: streamed\n"
    b"BACKUP FROM: primary\n"
    b"START TIME: 2026-11-25 14:14:36 UTC\n"
    b"LABEL: pg_basebackup base backup\n"
    b"START TIMELINE: 1\n"
    b"STOP TIME: 2026-11-25 14:14:37 UTC\n"
    b"STOP TIMELINE: 1\n"
)

# The promoted standby's timeline history file (all 41 bytes, tab-separated).
HISTORY_NAME = "00000002.history"
HISTORY_FILE = b"1\t0/3006098\tno recovery target specified\n"


def full_segment(page: bytes, segment_size: int = 16 * 1024 * 1024) -> bytes:
    """A segment of ``segment_size`` bytes that starts with the recorded ``page``."""
    return page + bytes(segment_size - len(page))
