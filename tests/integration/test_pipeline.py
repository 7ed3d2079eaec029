"""End to end: real exporters' packets over UDP -> sensor -> Kafka -> Faust enricher -> Kafka ->
sink -> ClickHouse (chDB), every stage a real `flowtally` subprocess, checked against tshark.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import yaml

from flowtally.clickhouse import connect
from flowtally.dev.localstack import Pipeline
from flowtally.settings import ClickHouseSettings
from sensors.netflow.pcap import iter_udp
from tests.oracle import DATA, OracleResult, shared_testdata, tshark_decode

# Each capture is replayed from its own loopback address, i.e. as its own exporter.
CAPTURES = {
    "127.0.0.11": [DATA / "softflowd-v5.pcap"],
    "127.0.0.12": [DATA / "softflowd-v9.pcap"],
    "127.0.0.13": [shared_testdata("netflow-pcaps", "pmacct", "101-NFv9-CISCO-cust_primitives__traffic-00.pcap")],
    "127.0.0.14": [shared_testdata("netflow-pcaps", "akvorado", "nfv5.pcap")],
}


def _plain(address: str) -> str:
    ip = ipaddress.ip_address(address)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped or ip)


def _inventory(oracle: OracleResult) -> dict[str, dict[str, str]]:
    """Owners for every private address the captures mention, as pods of a few workloads."""
    private = sorted({_plain(a) for r in oracle.records for a in (r.src, r.dst)
                      if ipaddress.ip_address(_plain(a)).is_private},
                     key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a)))
    owners = {}
    for i, ip in enumerate(private):
        owners[ip] = {"ip": ip, "kind": "pod", "namespace": f"ns{i % 3}", "name": f"pod-{i}",
                      "workload": f"wl{i % 5}", "workload_kind": "Deployment", "node": f"node-{i % 2}"}
    return owners


def _replay(port: int, captures: dict[str, Sequence[Path]], extra: Sequence[tuple[str, bytes]] = ()) -> int:
    """Send every UDP payload of the captures to the sensor, each capture from its own address."""
    sent = 0
    for source, files in captures.items():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((source, 0))
            for path in files:
                for packet in iter_udp(str(path)):
                    sock.sendto(packet.payload, ("127.0.0.1", port))
                    sent += 1
                    if sent % 50 == 0:
                        time.sleep(0.001)  # loopback UDP drops past the socket buffer otherwise
    for source, payload in extra:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((source, 0))
            sock.sendto(payload, ("127.0.0.1", port))
    return sent


def _pipeline(kafka_bootstrap: str, state: Path, inventory: dict[str, dict[str, str]] | None = None,
              **env: str) -> Pipeline:
    inv_path = None
    if inventory is not None:
        inv_path = state / "inventory.yaml"
        inv_path.write_text(yaml.safe_dump({"owners": list(inventory.values())}))
    return Pipeline(bootstrap=kafka_bootstrap, state_dir=state, topic_prefix=f"t{uuid.uuid4().hex[:10]}",
                    inventory=inv_path, extra_env=env)


@pytest.fixture
def running(kafka_bootstrap: str, tmp_path: Path) -> Iterator[tuple[Pipeline, OracleResult, dict[str, dict[str, str]]]]:
    oracle = tshark_decode([p for files in CAPTURES.values() for p in files])
    inventory = _inventory(oracle)
    # The captures' flows are years old: keep them past the default retention (TTL on flow_end;
    # not 36500 days: flow_end + TTL must stay below DateTime's 2106 limit or every row expires).
    pipe = _pipeline(kafka_bootstrap, tmp_path, inventory, FLOWTALLY_FLOWS_TTL_DAYS="3650")
    pipe.start()
    try:
        yield pipe, oracle, inventory
    finally:
        pipe.stop()


def test_real_exporter_captures_arrive_exactly(running: tuple[Pipeline, OracleResult, dict[str, dict[str, str]]]) -> None:
    pipe, _, inventory = running
    oracles = {source: tshark_decode(files) for source, files in CAPTURES.items()}
    expected = sum(o.totals[0] for o in oracles.values())
    assert expected > 100  # the captures really hold flows

    garbage = b"\x00\x09\x00\x01" + b"\xff" * 30  # a v9 header cut short: undecodable
    _replay(pipe.netflow_port, CAPTURES, extra=[("127.0.0.99", garbage)])
    assert pipe.wait_rows(expected, timeout=90) == expected

    sensor = pipe.stages["sensor"]
    errors = sensor.metric("flowtally_sensor_netflow_decode_errors_total", {"exporter": "127.0.0.99"})
    assert errors == 1
    assert sensor.metric("flowtally_sensor_netflow_flows_total") == expected

    t0 = time.monotonic()
    codes = pipe.stop(timeout=30)
    assert codes == {"sensor": 0, "enricher": 0, "sink": 0}
    assert time.monotonic() - t0 < 30

    client = connect(ClickHouseSettings(path=pipe.state_dir / "chdb"))
    try:
        for source, oracle in oracles.items():
            got = client.query(
                "SELECT count(), sum(bytes), sum(packets) FROM flows WHERE exporter = toIPv6({e:String})",
                parameters={"e": source},
            ).result_rows[0]
            assert tuple(int(v) for v in got) == oracle.totals, source
        keys = client.query(
            "SELECT toString(src_addr), toString(dst_addr), src_port, dst_port, proto, bytes, packets FROM flows"
        ).result_rows
        stored = Counter((_plain(s), _plain(d), sp, dp, p, b, k) for s, d, sp, dp, p, b, k in keys)
        wanted = Counter((_plain(r.src), _plain(r.dst), r.sport, r.dport, r.proto, r.bytes, r.packets)
                         for o in oracles.values() for r in o.records)
        assert stored == wanted
        identities = client.query(
            "SELECT DISTINCT toString(src_addr), src_kind, src_namespace, src_name, src_workload, src_node FROM flows"
        ).result_rows
        for address, kind, namespace, name, workload, node in identities:
            owner = inventory.get(_plain(address))
            if owner is None:
                assert kind in ("external", "private") and name == "", address
            else:
                assert (kind, namespace, name, workload, node) == (
                    "pod", owner["namespace"], owner["name"], owner["workload"], owner["node"])
        assert any(inventory.get(_plain(a)) for a, *_ in identities)
    finally:
        client.close()


def test_sigterm_drains_what_the_sensor_holds(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Flows still waiting in the sensor's batch (age limit far away) reach ClickHouse on SIGTERM."""
    pipe = _pipeline(kafka_bootstrap, tmp_path, None, FLOWTALLY_BATCH_MAX_AGE_MS="60000",
                     FLOWTALLY_BATCH_MAX_FLOWS="1000000")
    pipe.start()
    try:
        capture = {"127.0.0.21": CAPTURES["127.0.0.12"]}
        expected = tshark_decode(capture["127.0.0.21"]).totals
        _replay(pipe.netflow_port, capture)
        time.sleep(1.0)
        assert pipe.rows_inserted() == 0  # still held by the sensor
        t0 = time.monotonic()
        assert pipe.stages["sensor"].stop(timeout=20) == 0
        assert time.monotonic() - t0 < 10
        assert pipe.wait_rows(expected[0], timeout=60) == expected[0]
    finally:
        codes = pipe.stop()
    assert codes["enricher"] == 0 and codes["sink"] == 0


def test_generator_stream_totals(kafka_bootstrap: str, tmp_path: Path) -> None:
    """The synthetic v9 stream: ClickHouse holds exactly the flows, bytes and packets sent."""
    from flowtally.dev.generator import inventory_yaml, synthetic_cluster

    pipe = _pipeline(kafka_bootstrap, tmp_path)
    pipe.inventory = tmp_path / "inventory.yaml"
    pipe.inventory.write_text(inventory_yaml(synthetic_cluster(3)))
    pipe.start()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "flowtally.cli", "generate", "netflow", "--to", f"127.0.0.1:{pipe.netflow_port}",
             "--flows", "30000", "--rate", "20000", "--seed", "3", "--json"],
            check=True, capture_output=True, text=True, timeout=120,
        )
        sent = json.loads(out.stdout.strip().splitlines()[-1])
        assert pipe.wait_rows(sent["flows"], timeout=90) == sent["flows"]
    finally:
        codes = pipe.stop()
    assert set(codes.values()) == {0}
    client = connect(ClickHouseSettings(path=tmp_path / "chdb"))
    try:
        flows, nbytes, packets, unnamed_pods = client.query(
            "SELECT count(), sum(bytes), sum(packets), countIf(src_kind = 'private' AND dst_kind = 'private') FROM flows"
        ).result_rows[0]
        assert (flows, nbytes, packets) == (sent["flows"], sent["bytes"], sent["packets"])
        assert unnamed_pods == 0  # every cluster address of the synthetic stream is in its inventory
    finally:
        client.close()


def test_bad_kafka_messages_go_to_the_dlq_and_lose_nothing_else(kafka_bootstrap: str, tmp_path: Path) -> None:
    """A raw message that is not an Arrow batch is parked in the DLQ with the reason; the good
    batches around it are all stored."""
    import asyncio

    import numpy as np

    from flowtally import kafka
    from flowtally.settings import KafkaSettings
    from flowtally.wire import encode_batch
    from sensors.schema import build_raw_table, ipv4_to_mapped

    pipe = _pipeline(kafka_bootstrap, tmp_path)
    pipe.start()
    settings = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=pipe.topic_prefix)
    n = 1234
    good = build_raw_table({
        "src_addr": ipv4_to_mapped(np.arange(n, dtype=np.uint32) + 0x0AF40000),
        "dst_addr": ipv4_to_mapped(np.full(n, 0x510245A0, dtype=np.uint32)),
        "bytes": np.arange(n) * 10, "packets": np.ones(n), "end": np.full(n, 1_700_000_000_000),
    })
    value, headers = encode_batch(good, "raw.v1")

    async def produce_and_read_dlq() -> list[tuple[bytes, dict[str, bytes]]]:
        producer = kafka.producer(settings)
        await producer.start()
        try:
            await producer.send_and_wait(settings.topic("raw"), value, key=b"a", headers=headers)
            await producer.send_and_wait(settings.topic("raw"), b"not arrow at all", key=b"a", headers=headers)
            await producer.send_and_wait(settings.topic("raw"), value, key=b"a", headers=[("flowtally-schema", b"raw.v0")])
            await producer.send_and_wait(settings.topic("raw"), value, key=b"a", headers=headers)
        finally:
            await producer.stop()
        consumer = kafka.consumer(settings, settings.topic("dlq"), group_id=f"{pipe.topic_prefix}-dlq-reader")
        await consumer.start()
        got: list[tuple[bytes, dict[str, bytes]]] = []
        try:
            deadline = time.monotonic() + 60
            while len(got) < 2 and time.monotonic() < deadline:
                for messages in (await consumer.getmany(timeout_ms=1000)).values():
                    got += [(m.value, dict(m.headers)) for m in messages]
        finally:
            await consumer.stop()
        return got

    try:
        dlq = asyncio.run(produce_and_read_dlq())
        assert pipe.wait_rows(2 * n, timeout=60) == 2 * n
        enricher = pipe.stages["enricher"]
        assert enricher.metric("flowtally_enricher_batches_total", {"outcome": "dlq_not-arrow"}) == 1
        assert enricher.metric("flowtally_enricher_batches_total", {"outcome": "dlq_wrong-schema"}) == 1
    finally:
        codes = pipe.stop()
    assert set(codes.values()) == {0}
    assert sorted(v for v, _ in dlq) == sorted([b"not arrow at all", value])
    assert all(h["flowtally-stage"] == b"enricher" and h["flowtally-error"] for _, h in dlq)


def test_a_stage_that_cannot_start_leaves_nothing_running(kafka_bootstrap: str, tmp_path: Path) -> None:
    """A bad sensor setting: the sensor exits 2 naming it, and the stages already started are stopped."""
    from flowtally.dev.localstack import StageFailed

    pipe = _pipeline(kafka_bootstrap, tmp_path, None, FLOWTALLY_BATCH_MAX_FLOWS="0")
    with pytest.raises(StageFailed, match="batch_max_flows"):
        pipe.start()
    assert pipe.stages["sensor"].process is not None and pipe.stages["sensor"].process.returncode == 2
    for name in ("sink", "enricher"):
        process = pipe.stages[name].process
        assert process is not None and process.poll() is not None, name
