"""Bounded fuzz run of the NetFlow decoder: `python -m tests.benchmarks.fuzz_decoder --runs 1000000`.

Feeds mutated real export packets (the softflowd and pmacctd captures in tests/data, the
third-party captures in ../shared/testdata; v5, v9 and IPFIX) to :func:`decode_payloads`, with
template state kept across calls (so mutated templates meet mutated data), and checks on every
call that:

* nothing raises out of the decoder (an exception is a finding: the input is saved);
* nothing hangs: a call slower than ``--hang-ms`` is a finding (a SIGALRM watchdog also stops a
  call stuck for 10 s);
* everything is counted: every datagram is counted as a packet of its exporter, and the table has
  exactly the records the counters say (records + reverse records are both in ``records``).

Engines: ``--engine atheris`` uses libFuzzer's coverage-guided mutation through atheris (``pip
install atheris``: a manylinux wheel, no clang needed; the decoder is instrumented with
``atheris.instrument_all()``; libFuzzer ends the process when its runs are done, so that engine
reports findings as they happen, not the summary); the default
``--engine mutate`` is a seeded random mutator (bit flips, interesting values in length and ID
fields, truncation, insertion, deletion, splicing packets and flowsets), reproducible with
``--seed``. Prints runs/s and the findings; exit code 1 if there were any.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from types import FrameType

from sensors.netflow.decoder import decode_payloads, flush_pending
from sensors.netflow.pcap import iter_udp
from sensors.netflow.stats import DecodeStats
from sensors.netflow.templates import TemplateStore
from sensors.schema import RAW_SCHEMA
from tests.oracle import DATA, shared_testdata

EXPORTER = b"\x00" * 10 + b"\xff\xff" + bytes([203, 0, 113, 9])
INTERESTING = [0, 1, 2, 3, 4, 255, 256, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF]


def seeds() -> list[bytes]:
    """Real export packets: our golden captures and the shared third-party ones."""
    out: list[bytes] = []
    for path in sorted(DATA.glob("*.pcap")):
        if path.name != "traffic.pcap":
            out += [p.payload for p in iter_udp(str(path))]
    for rel in ("akvorado/data+templates.pcap", "akvorado/options-data.pcap", "akvorado/options-template.pcap",
                "akvorado/nfv5.pcap", "pmacct/106-IPFIXv10-HUAWEI-vrf_name__traffic-00.pcap"):
        try:
            path = shared_testdata("netflow-pcaps", *rel.split("/"))
        except Exception:  # the shared data is optional here
            continue
        out += [p.payload for p in iter_udp(str(path))][:20]
    return [s for s in out if len(s) >= 4]


class Mutator:
    """Random structure-aware-ish mutations of real packets."""

    def __init__(self, corpus: list[bytes], rng: random.Random) -> None:
        self.corpus = corpus
        self.rng = rng

    def __call__(self) -> bytes:
        rng = self.rng
        data = bytearray(rng.choice(self.corpus))
        for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
            op = rng.randrange(8)
            n = len(data)
            if n == 0:
                data = bytearray(rng.choice(self.corpus))
                n = len(data)
            at = rng.randrange(n)
            if op == 0:  # bit flip
                data[at] ^= 1 << rng.randrange(8)
            elif op == 1:  # random byte
                data[at] = rng.randrange(256)
            elif op == 2 and n >= 2:  # interesting 16-bit value (lengths, IDs, counts)
                at = rng.randrange(n - 1) & ~1
                data[at : at + 2] = rng.choice(INTERESTING).to_bytes(2, "big")
            elif op == 3:  # truncate
                del data[rng.randrange(n + 1) :]
            elif op == 4:  # insert bytes
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 2, 4, 8))))
            elif op == 5:  # delete bytes
                del data[at : at + rng.choice((1, 2, 4, 8))]
            elif op == 6:  # splice: our head, another packet's tail
                other = rng.choice(self.corpus)
                data = data[:at] + other[rng.randrange(len(other)) :]
            else:  # duplicate a chunk (repeated flowsets or records)
                end = min(n, at + rng.choice((4, 8, 16, 48, 64)))
                data[end:end] = data[at:end]
        return bytes(data)


class _Hang(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise _Hang


class Harness:
    """Decodes inputs and keeps the score."""

    def __init__(self, hang_ms: float, findings: Path) -> None:
        self.templates = TemplateStore()
        self.hang_ms = hang_ms
        self.findings = findings
        self.datagrams = 0
        self.calls = 0
        self.rows = 0
        self.errors: Counter[str] = Counter()
        self.problems: Counter[str] = Counter()
        self.slowest_ms = 0.0
        self.received = 1_700_000_000_000

    def decode(self, payloads: list[bytes]) -> None:
        self.calls += 1
        self.received += 1
        stats = DecodeStats()
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, 10.0)
        try:
            table = decode_payloads(EXPORTER, payloads, [self.received] * len(payloads), self.templates, stats)
        except _Hang:
            self._finding("hang", payloads)
            return
        except Exception as exc:  # that is what we look for
            self._finding(f"raised {type(exc).__name__}: {exc}", payloads)
            return
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        ms = (time.perf_counter() - t0) * 1000
        self.slowest_ms = max(self.slowest_ms, ms)
        if ms > self.hang_ms:
            self._finding("slow", payloads)
        self.datagrams += len(payloads)
        self.rows += table.num_rows
        if stats.packets != len(payloads):
            self._finding("datagrams not counted", payloads)
        if table.num_rows != stats.records:
            self._finding("rows differ from counted records", payloads)
        if table.schema != RAW_SCHEMA:
            self._finding("schema", payloads)
        self.errors.update(stats.errors_by_reason())
        if self.calls % 1000 == 0:  # templates learnt from noise must not pile up forever
            end = DecodeStats()
            flush_pending(self.templates, end)
            self.errors.update(end.errors_by_reason())
            self.templates = TemplateStore()

    def _finding(self, what: str, payloads: list[bytes]) -> None:
        key = what.split(":")[0]
        self.problems[key] += 1
        if self.problems[key] <= 5:
            self.findings.mkdir(parents=True, exist_ok=True)
            path = self.findings / f"{key.replace(' ', '_')}-{self.calls}.bin"
            path.write_bytes(b"".join(len(p).to_bytes(4, "big") + p for p in payloads))
            print(f"finding: {what} (inputs in {path})", file=sys.stderr)


def run_mutate(args: argparse.Namespace, harness: Harness) -> None:
    corpus = seeds()
    mutate = Mutator(corpus, random.Random(args.seed))
    rng = random.Random(args.seed + 1)
    done = 0
    while done < args.runs:
        n = min(args.batch, args.runs - done)
        # Mostly mutants, with some intact packets so that templates exist for mutated data.
        batch = [mutate() if rng.random() < 0.9 else rng.choice(corpus) for _ in range(n)]
        harness.decode(batch)
        done += n


def run_atheris(args: argparse.Namespace, harness: Harness) -> None:
    import atheris

    def one(data: bytes) -> None:
        harness.decode([data])

    corpus_dir = Path(args.findings) / "atheris-corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(seeds()):
        (corpus_dir / f"seed-{i}").write_bytes(s)
    atheris.instrument_all()  # coverage feedback from the already imported decoder modules
    atheris.Setup([sys.argv[0], f"-runs={args.runs}", f"-seed={args.seed}", str(corpus_dir)], one)
    with contextlib.suppress(SystemExit):  # libFuzzer exits when the runs are done
        atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs to decode")
    parser.add_argument("--engine", choices=["mutate", "atheris"], default="mutate")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="datagrams per decode call (mutate engine)")
    parser.add_argument("--hang-ms", type=float, default=1000.0, help="a call slower than this is a finding")
    parser.add_argument("--findings", type=Path, default=Path("fuzz-findings"))
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    harness = Harness(args.hang_ms, args.findings)
    t0 = time.process_time()
    if args.engine == "atheris":
        run_atheris(args, harness)
    else:
        run_mutate(args, harness)
    cpu = time.process_time() - t0
    print(f"{harness.datagrams:,} datagrams in {harness.calls:,} decode calls, {cpu:.1f} CPU-s "
          f"({harness.datagrams / max(cpu, 1e-9):,.0f}/s); {harness.rows:,} records decoded; "
          f"slowest call {harness.slowest_ms:.1f} ms")
    print("counted errors:", dict(sorted(harness.errors.items())))
    print("findings:", dict(harness.problems) or "none")
    return 1 if harness.problems else 0


if __name__ == "__main__":
    sys.exit(main())
