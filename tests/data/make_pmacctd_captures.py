#!/usr/bin/env python3
"""Regenerate the golden pmacctd captures in this folder (see README.md).

For each export format (NetFlow v9, IPFIX), start dumpcap on the loopback interface filtered on a
UDP port, run Debian's ``pmacctd`` with its ``nfprobe`` plugin on ``traffic.pcap`` (read with
``pcap_savefile``: at the end of the file pmacctd shuts down and the plugin exports every flow it
still holds), then stop the capture and keep the exported packets as ``pmacctd-*.pcap``.

``traffic.pcap`` is the file made by ``make_softflowd_captures.py`` (not rebuilt here).

Run as root (dumpcap on ``lo``): ``python3 tests/data/make_pmacctd_captures.py``. The captures
carry the time they were made, so a rerun changes the files but not their flows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Run as a script from this folder's parent: the sibling script is importable by name.
from make_softflowd_captures import loopback_capture

HERE = Path(__file__).resolve().parent

# output file, nfprobe_version, UDP port
EXPORTS = [
    ("pmacctd-v9.pcap", 9, 20565),
    ("pmacctd-ipfix.pcap", 10, 20566),
]

CONFIG = """\
daemonize: false
pcap_savefile: {traffic}
plugins: nfprobe
nfprobe_receiver: 127.0.0.1:{port}
nfprobe_version: {version}
aggregate: src_host, dst_host, src_port, dst_port, proto, tos
"""


def capture_export(traffic: Path, out: Path, version: int, port: int, tmp: Path) -> None:
    pmacctd = shutil.which("pmacctd") or shutil.which("pmacctd", path="/usr/sbin:/sbin") or sys.exit(
        "pmacctd not found (apt-get install pmacct)"
    )
    conf = tmp / f"{out.stem}.conf"
    conf.write_text(CONFIG.format(traffic=traffic, port=port, version=version))
    with loopback_capture(port, out, tmp):
        done = subprocess.run([pmacctd, "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=60, check=False)
        if done.returncode != 0:
            sys.exit(f"pmacctd exited with {done.returncode}: {done.stderr.decode(errors='replace')}")


def main() -> int:
    if os.geteuid() != 0:
        print("run as root: dumpcap needs to capture on lo", file=sys.stderr)
        return 1
    traffic = HERE / "traffic.pcap"
    with tempfile.TemporaryDirectory(prefix="pmacctd-") as tmp:
        for name, version, port in EXPORTS:
            capture_export(traffic, HERE / name, version, port, Path(tmp))
            print(f"{name}: {(HERE / name).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
