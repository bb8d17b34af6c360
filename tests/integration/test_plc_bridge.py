"""The PLC bridge (issue 21), end to end: the real daemon (``inspectd serve``), the real bridge
(``inspectd plc-bridge``), real PLC clients (asyncua's Client, pymodbus's AsyncModbusTcpClient), all on loopback.

What a line depends on: every verdict reaches the PLC once, in order, with the daemon's seq, frame id and
verdict (both protocols at once); a slow PLC loses nothing the buffer holds and is told, by the fault bit, when
verdicts were lost; a dead daemon raises the fault within the heartbeat timeout; a restarted one is reported
and its verdicts flow again. The truth is a separate subscriber on the daemon's own PUB socket.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from daemon.reasons import REASON_CODES, REASON_NAMES
from plc import modbus_map as mm
from plc.handshake import Fault
from tests.integration.daemon_harness import (
    CameraPusher,
    VerdictCollector,
    calibrated_package,
    daemon_settings,
)
from tests.integration.plc_harness import (
    BridgeProcess,
    Consumed,
    ModbusPlc,
    OpcUaPlc,
    bridge_settings,
    wait_for,
)
from tests.integration.reliability_harness import free_port
from tools.daemon_process import DaemonProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
LINE = "plc-line"


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(21)
    return [rng.integers(0, 255, (96, 96), dtype=np.uint8) for _ in range(24)]


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory: pytest.TempPathFactory, images: list[np.ndarray]) -> Path:
    d = tmp_path_factory.mktemp("plc") / "pkg"
    calibrated_package(d, images, input_size=(32, 32))  # threshold at the median: PASS and REJECT both occur
    return d


@pytest.fixture(scope="module")
def daemon(package_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for the tests that do not kill it (ephemeral ports, 100 ms heartbeats)."""
    settings = daemon_settings(package_dir, line=LINE, publisher={"heartbeat_ms": 100})
    with DaemonProcess(settings, tmp_path_factory.mktemp("daemon"), name="daemon") as d:
        yield d


@pytest.fixture(scope="module")
def truth(daemon: DaemonProcess) -> Iterator[VerdictCollector]:
    """What the daemon published, from its own PUB socket."""
    with VerdictCollector(daemon.publisher_endpoint, LINE) as c:
        yield c


def stream(endpoint: str, frames: Sequence[tuple[str, np.ndarray]], fps: float) -> None:
    """The camera, on a thread of its own (its own socket)."""
    with CameraPusher(endpoint, ctx=zmq.Context.instance()) as cam:
        cam.stream(frames, fps)


async def send(endpoint: str, prefix: str, images: list[np.ndarray], n: int, fps: float = 200) -> list[str]:
    frames = [(f"{prefix}-{i:04d}", images[i % len(images)]) for i in range(n)]
    await asyncio.to_thread(stream, endpoint, frames, fps)
    return [fid for fid, _ in frames]


def published(collector: VerdictCollector, prefix: str) -> list[dict[str, Any]]:
    return sorted(
        (v for v in list(collector.verdicts) if v["frame_id"].startswith(prefix)), key=lambda v: v["seq"]
    )


async def published_n(collector: VerdictCollector, prefix: str, n: int) -> list[dict[str, Any]]:
    async def enough() -> list[dict[str, Any]] | None:
        got = published(collector, prefix)
        return got if len(got) >= n else None

    got: list[dict[str, Any]] = await wait_for(enough, 30, f"{n} verdicts {prefix}* from the daemon")
    assert len(got) == n, f"{len(got)} verdicts for {n} frames {prefix}*"
    return got


def as_modbus(v: dict[str, Any]) -> tuple[int, int, bool, int]:
    return v["seq"], zlib.crc32(v["frame_id"].encode()), v["verdict"] == "PASS", REASON_CODES[v["reason"]]


def of_modbus(c: Consumed) -> tuple[int, int, bool, int]:
    return c.seq, c.frame_hash, c.passed, c.reason_code


def as_opcua(v: dict[str, Any]) -> tuple[int, str, bool, int]:
    return v["seq"], v["frame_id"], v["verdict"] == "PASS", REASON_CODES[v["reason"]]


def of_opcua(c: Consumed) -> tuple[int, str | None, bool, int]:
    return c.seq, c.frame_id, c.passed, c.reason_code


async def fault_free(mb: ModbusPlc, up: OpcUaPlc | None = None, timeout: float = 30) -> None:
    """The bridge vouches for verdicts: the daemon's heartbeat (ready) reached it."""

    async def clear() -> bool:
        image = await mb.read()
        if up is None:
            return image.faults == 0
        (opc_fault,) = await up.read("Status.FaultCauses")
        return image.faults == 0 and opc_fault == 0

    await wait_for(clear, timeout, "the bridge's fault to clear (daemon heartbeat, ready)")
    mb.faults_seen.clear()
    if up is not None:
        up.faults_seen.clear()


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for key, value in samples.items():
        if key.startswith(name + "{") and ",".join(sorted(key[len(name) + 1 : -1].split(","))) == want:
            return value
    raise KeyError(f"{name}{{{want}}} not scraped")


# -- 1: every verdict, both protocols at once -----------------------------------------------------------------
def test_opcua_and_modbus_plcs_each_read_every_verdict_of_a_200_frame_stream(
    daemon: DaemonProcess, truth: VerdictCollector, images: list[np.ndarray], tmp_path: Path
) -> None:
    settings = bridge_settings(daemon.publisher_endpoint, LINE, handshake={"buffer_size": 128})
    n = 200

    async def run(bridge: BridgeProcess) -> tuple[ModbusPlc, OpcUaPlc, list[Any], dict[str, float]]:
        async with (
            ModbusPlc(bridge.modbus_port, settings.modbus.slots) as mb,
            OpcUaPlc(bridge.opcua_endpoint, bridge.namespace_index, LINE) as up,
        ):
            await up.subscribe_events()
            await fault_free(mb, up)
            enum_type = up.client.get_node(f"ns={up.ns};s=ReasonCodeEnum")
            enum_values = await (await enum_type.get_child(["0:EnumValues"])).read_value()
            reason_type = await up.node("Result.ReasonCode").read_data_type()
            up.enum = ({e.Value: e.DisplayName.Text for e in enum_values}, reason_type == enum_type.nodeid)
            await asyncio.gather(
                send(daemon.camera_endpoint, "s200", images, n, fps=100),
                mb.consume(n, 60),
                up.consume(n, 60),
            )
            await wait_for(lambda: len(up.events) >= n, 10, f"{n} OPC UA verdict events")
            image = await mb.read()
            after = await up.read("Handshake.Pending", "Status.Fault", "Latest.Seq")
            samples = await asyncio.to_thread(bridge.scrape)  # over HTTP, while both PLCs are connected
            return mb, up, [image, *after], samples

    with BridgeProcess(settings, tmp_path, name="bridge") as bridge:
        mb, up, (image, opc_pending, opc_fault, latest_seq), samples = asyncio.run(run(bridge))
    verdicts = published(truth, "s200")
    assert len(verdicts) == n
    assert {v["verdict"] for v in verdicts} == {"PASS", "REJECT"}, "a stream of one verdict proves less"
    assert [v["seq"] for v in verdicts] == list(range(verdicts[0]["seq"], verdicts[0]["seq"] + n))
    # Every verdict, once, in order, with the daemon's seq, frame id (Modbus: its CRC-32), verdict and reason.
    assert [of_modbus(c) for c in mb.consumed] == [as_modbus(v) for v in verdicts]
    assert [of_opcua(c) for c in up.consumed] == [as_opcua(v) for v in verdicts]
    assert [(e["Seq"], e["FrameId"], e["Pass"]) for e in up.events[:n]] == [
        (v["seq"], v["frame_id"], v["verdict"] == "PASS") for v in verdicts
    ]
    # Acknowledged as they were read: nothing left behind, no fault at any read while the daemon streamed.
    assert image.pending == 0 and opc_pending == 0 and not opc_fault and latest_seq == verdicts[-1]["seq"]
    assert set(mb.faults_seen) == {0} and set(up.faults_seen) == {0}
    for p in ("modbus", "opcua"):
        labels = {"line": LINE, "protocol": p}
        assert metric(samples, "inspectd_plc_acknowledged_total", **labels) == n
        assert metric(samples, "inspectd_plc_dropped_total", **labels) == 0
        assert metric(samples, "inspectd_plc_buffer_depth", **labels) == 0
        assert metric(samples, "inspectd_plc_clients", **labels) == 1  # scraped while both were connected
        assert metric(samples, "inspectd_plc_update_latency_seconds_count", **labels) == n
        assert metric(samples, "inspectd_plc_ack_seconds_count", **labels) == n
    assert metric(samples, "inspectd_plc_verdicts_total", line=LINE) == n
    # The OPC UA ReasonCode enumeration is the one table (daemon/reasons.py), and Result.ReasonCode is of it.
    assert up.enum == (REASON_NAMES, True)
    # Publication (daemon clock) → first seen by the PLC's poll (same host): the bridge plus one scan.
    t_pub = {v["seq"]: v["t_published"] for v in verdicts}
    for name, plc in (("modbus", mb.consumed), ("opcua", up.consumed)):
        lat = sorted(1000 * (c.t_seen - t_pub[c.seq]) for c in plc)
        bridge_lat = (
            1000 * metric(samples, "inspectd_plc_update_latency_seconds_sum", line=LINE, protocol=name) / n
        )
        print(
            f"\n{name}: publish → PLC saw it: p50 {statistics.median(lat):.1f} ms, "
            f"p99 {lat[int(0.99 * (len(lat) - 1))]:.1f} ms, max {lat[-1]:.1f} ms; "
            f"publish → served by the bridge: mean {bridge_lat:.2f} ms"
        )


# -- 2: a slow PLC ---------------------------------------------------------------------------------------------
def test_a_slow_plc_loses_nothing_within_the_buffer_and_sees_the_fault_when_it_overflows(
    daemon: DaemonProcess, truth: VerdictCollector, images: list[np.ndarray], tmp_path: Path
) -> None:
    capacity = 12  # 16 + 12 × 8 = 112 registers: one read
    settings = bridge_settings(
        daemon.publisher_endpoint, LINE, handshake={"buffer_size": capacity}, modbus={"slots": capacity}
    )
    cam = daemon.camera_endpoint

    async def run(bridge: BridgeProcess) -> dict[str, Any]:
        async with (
            ModbusPlc(bridge.modbus_port, capacity) as mb,
            OpcUaPlc(bridge.opcua_endpoint, bridge.namespace_index, LINE) as up,
        ):
            await fault_free(mb, up)

            async def pending(k: int) -> bool:
                image = await mb.read()
                (opc,) = await up.read("Handshake.Pending")
                return image.pending == k and opc == k

            # Ten verdicts while the PLC does not acknowledge: all buffered, in order, no fault.
            await send(cam, "slow-a", images, 10)
            a = await published_n(truth, "slow-a", 10)
            await wait_for(lambda: pending(10), 10, "10 verdicts buffered on both protocols")
            image = await mb.read()
            assert image.faults == 0
            assert [of_modbus(c) for c in (image.slot(i) for i in range(10)) if c] == [
                as_modbus(v) for v in a
            ]
            # Late acknowledgements take them all.
            await mb.step()
            await up.consume(10, 20)
            assert [of_modbus(c) for c in mb.consumed] == [as_modbus(v) for v in a]
            assert [of_opcua(c) for c in up.consumed] == [as_opcua(v) for v in a]
            await wait_for(lambda: pending(0), 10, "the buffers empty after the acknowledgements")

            # Twenty more, unacknowledged: twelve are kept, the eight newest dropped, the fault raised.
            await send(cam, "slow-b", images, 20)
            b = await published_n(truth, "slow-b", 20)
            await wait_for(lambda: pending(capacity), 10, f"{capacity} buffered")

            async def dropped() -> bool:
                (opc,) = await up.read("Handshake.Dropped")
                return (await mb.read()).u32(mm.DROPPED) == 8 and opc == 8

            await wait_for(dropped, 10, "8 dropped on both protocols")
            full = await mb.read()
            opc_full = await up.read("Status.Fault", "Status.FaultCauses", "Handshake.Overflow", "Result.Seq")
            mid = bridge.scrape()
            # The PLC catches up: it takes the twelve, and stays in fault until it has seen past the loss.
            await mb.step()
            await up.consume(10 + capacity, 20)
            caught_up = await mb.read()
            (opc_caught_up,) = await up.read("Status.Fault")
            await send(cam, "slow-c", images, 1)
            c = await published_n(truth, "slow-c", 1)
            await wait_for(lambda: pending(1), 10, "the next verdict buffered")
            await mb.step()
            await up.consume(11 + capacity, 20)

            async def cleared() -> bool:
                (opc,) = await up.read("Status.Fault")
                return (await mb.read()).faults == 0 and not opc

            await wait_for(cleared, 10, "the fault to clear once the PLC acknowledged past the loss")
            return {
                "a": a, "b": b, "c": c, "full": full, "opc_full": opc_full, "mid": mid, "mb": mb, "up": up,
                "caught_up": caught_up, "opc_caught_up": opc_caught_up,
            }  # fmt: skip

    with BridgeProcess(settings, tmp_path, name="bridge-slow") as bridge:
        r = asyncio.run(run(bridge))
    b, c, full, mb, up = r["b"], r["c"], r["full"], r["mb"], r["up"]
    kept, lost = b[:capacity], b[capacity:]
    assert [v["seq"] for v in b] == list(range(b[0]["seq"], b[0]["seq"] + 20))
    # Overflow: both protocols in fault, the kept verdicts in their slots in order, the count of the dropped.
    assert full.pending == capacity and full.u32(mm.DROPPED) == len(lost) == 8
    assert (
        full.faults == Fault.OVERFLOW and full.status & mm.STATUS_FAULT and full.status & mm.STATUS_OVERFLOW
    )
    assert [of_modbus(s) for s in (full.slot(i) for i in range(capacity)) if s] == [
        as_modbus(v) for v in kept
    ]
    opc_fault, opc_causes, opc_overflow, opc_presented = r["opc_full"]
    assert opc_fault and opc_causes == Fault.OVERFLOW and opc_overflow and opc_presented == kept[0]["seq"]
    for p in ("modbus", "opcua"):
        assert metric(r["mid"], "inspectd_plc_dropped_total", line=LINE, protocol=p) == 8
        assert metric(r["mid"], "inspectd_plc_fault", line=LINE, protocol=p) == 1
        assert metric(r["mid"], "inspectd_plc_faults_total", line=LINE, protocol=p, cause="overflow") == 1
        assert metric(r["mid"], "inspectd_plc_buffer_depth", line=LINE, protocol=p) == capacity
    # Caught up on what was kept, the PLC is still told to divert: it has not yet seen where the loss is.
    assert r["caught_up"].pending == 0 and r["caught_up"].faults == Fault.OVERFLOW and r["opc_caught_up"]
    # The verdict after the loss carries LostBefore; its seq jumps over exactly the dropped ones.
    want = [as_modbus(v) for v in [*r["a"], *kept, *c]]
    assert [of_modbus(x) for x in mb.consumed] == want
    assert [of_opcua(x) for x in up.consumed] == [as_opcua(v) for v in [*r["a"], *kept, *c]]
    for plc in (mb, up):
        after_loss = plc.consumed[-1]
        assert after_loss.flags & mm.FLAG_LOST_BEFORE and after_loss.seq == kept[-1]["seq"] + len(lost) + 1
        assert not any(x.flags & mm.FLAG_LOST_BEFORE for x in plc.consumed[:-1])


# -- 3: the daemon killed, then restarted -------------------------------------------------------------------
def test_a_killed_daemon_raises_the_fault_within_the_heartbeat_timeout_and_a_restart_is_reported(
    package_dir: Path, images: list[np.ndarray], tmp_path: Path
) -> None:
    line = "plc-kill"
    cam_ep, pub_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    heartbeat_ms, timeout_ms = 100, 600
    settings = daemon_settings(
        package_dir,
        line=line,
        sources={"camera": {"endpoint": cam_ep}},
        publisher={"endpoint": pub_ep, "heartbeat_ms": heartbeat_ms},
    )
    plc_settings = bridge_settings(pub_ep, line, subscriber={"heartbeat_timeout_ms": timeout_ms})
    second = DaemonProcess(settings, tmp_path / "b", name="daemon-b")

    async def run(first: DaemonProcess, bridge: BridgeProcess, sub: VerdictCollector) -> dict[str, Any]:
        async with (
            ModbusPlc(bridge.modbus_port, plc_settings.modbus.slots) as mb,
            OpcUaPlc(bridge.opcua_endpoint, bridge.namespace_index, line) as up,
        ):
            await fault_free(mb, up)
            await send(cam_ep, "k-a", images, 5)
            await asyncio.gather(mb.consume(5, 20), up.consume(5, 20))
            a = await published_n(sub, "k-a", 5)
            # kill -9: no last heartbeat, no goodbye. The bridge must notice the silence by itself.
            t_kill = time.monotonic()
            await asyncio.to_thread(first.kill9)

            async def silent_modbus() -> float | None:
                faults = (await mb.read()).faults
                return time.monotonic() - t_kill if faults & Fault.DAEMON_SILENT else None

            async def silent_opcua() -> float | None:
                (faults,) = await up.read("Status.FaultCauses")
                return time.monotonic() - t_kill if faults & Fault.DAEMON_SILENT else None

            elapsed = await asyncio.gather(
                wait_for(silent_modbus, 10, "DAEMON_SILENT on Modbus after the kill", poll_s=0.005),
                wait_for(silent_opcua, 10, "DAEMON_SILENT on OPC UA after the kill", poll_s=0.005),
            )
            opc_after_kill = await up.read("Status.Fault", "Status.FaultCauses", "Status.DaemonAlive")
            await asyncio.to_thread(second.start)
            await fault_free(mb, up, timeout=60)
            await send(cam_ep, "k-b", images, 10)
            await asyncio.gather(mb.consume(15, 20), up.consume(15, 20))
            b = await published_n(sub, "k-b", 10)
            status = await up.read("Status.Restarts", "Status.BootId", "Status.BootNo")
            boot_no = (await mb.read()).registers[mm.BOOT_NO]
            return {
                "a": a, "b": b, "elapsed": elapsed, "opc_after_kill": opc_after_kill, "status": status,
                "boot_no": boot_no, "mb": mb, "up": up,
            }  # fmt: skip

    try:
        with (
            DaemonProcess(settings, tmp_path / "a", name="daemon-a") as first,
            VerdictCollector(pub_ep, line) as sub,
            BridgeProcess(plc_settings, tmp_path, name="bridge-kill") as bridge,
        ):
            r = asyncio.run(run(first, bridge, sub))
            samples = bridge.scrape()
            boot_a = r["a"][0]["boot_id"]
    finally:
        second.stop()
    mb_s, ua_s = r["elapsed"]
    print(
        f"\nkill -9 → DAEMON_SILENT seen by the PLCs after {1000 * mb_s:.0f} ms (Modbus), {1000 * ua_s:.0f} ms"
        f" (OPC UA); heartbeat timeout {timeout_ms} ms, daemon heartbeat every {heartbeat_ms} ms"
    )
    # Within the timeout (plus the bridge's 50 ms tick and a loaded machine's scheduling), and not long before
    # it: the last heartbeat came at most one heartbeat interval before the kill.
    for elapsed in (mb_s, ua_s):
        assert (timeout_ms - heartbeat_ms - 50) / 1000 <= elapsed <= (timeout_ms + 500) / 1000
    opc_fault, opc_causes, opc_alive = r["opc_after_kill"]
    assert opc_fault and opc_causes & Fault.DAEMON_SILENT and not opc_alive
    b = r["b"]
    boot_b = b[0]["boot_id"]
    assert boot_b != boot_a and [v["seq"] for v in b] == list(range(1, 11))  # a new boot, from seq 1
    restarts, opc_boot_id, opc_boot_no = r["status"]
    assert restarts == 1 and opc_boot_id == boot_b and opc_boot_no == 2 == r["boot_no"]
    for plc in (r["mb"], r["up"]):
        assert [x.boot_no for x in plc.consumed] == [1] * 5 + [2] * 10
        assert [x.seq for x in plc.consumed] == [v["seq"] for v in [*r["a"], *b]]
        assert [bool(x.flags & mm.FLAG_NEW_BOOT) for x in plc.consumed] == [True] + [False] * 4 + [True] + [
            False
        ] * 9
    assert [of_modbus(x) for x in r["mb"].consumed] == [as_modbus(v) for v in [*r["a"], *b]]
    assert [of_opcua(x) for x in r["up"].consumed] == [as_opcua(v) for v in [*r["a"], *b]]
    assert metric(samples, "inspectd_plc_daemon_restarts_total", line=line) == 1
    for p in ("modbus", "opcua"):
        assert metric(samples, "inspectd_plc_faults_total", line=line, protocol=p, cause="daemon_silent") == 1
        assert metric(samples, "inspectd_plc_fault", line=line, protocol=p) == 0


# -- 4: OPC UA security --------------------------------------------------------------------------------------
def _certificate(directory: Path, name: str, uri: str, server: bool) -> tuple[Path, Path]:
    # The key goes beside the directory, which a PLC's trusted_clients holds certificates only.
    """A self-signed application certificate (DER) and its key (PEM), as an OPC UA deployment makes them."""
    import ipaddress

    from asyncua.crypto.cert_gen import (
        dump_private_key_as_pem,
        generate_private_key,
        generate_self_signed_app_certificate,
    )
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = generate_private_key()
    names = [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")]
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    usage = [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = generate_self_signed_app_certificate(key, name, {}, names, usage, days=2)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.der", directory.parent / f"{name}.key.pem"
    cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    key_path.write_bytes(dump_private_key_as_pem(key))
    return cert_path, key_path


def test_opcua_with_certificates_serves_trusted_clients_only_and_refuses_anonymous(tmp_path: Path) -> None:
    from asyncua import Client, ua
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    from plc.opcua import APPLICATION_URI

    server_cert, server_key = _certificate(tmp_path / "server", "bridge", APPLICATION_URI, server=True)
    client_uri = "urn:test:plc"
    client_cert, client_key = _certificate(tmp_path / "trusted", "plc", client_uri, server=False)
    stranger_cert, stranger_key = _certificate(tmp_path / "other", "stranger", client_uri, server=False)
    line = "plc-secure"
    settings = bridge_settings(
        "tcp://127.0.0.1:1",  # no daemon: the bridge is in fault (STARTING), which the PLC must read
        line,
        opcua={
            "certificate": str(server_cert),
            "private_key": str(server_key),
            "trusted_clients": str(tmp_path / "trusted"),
        },
        modbus={"enabled": False},
    )

    async def client(cert: Path | None, key: Path | None, *, identity: bool, url: str) -> Client:
        c = Client(url, timeout=10)
        c.application_uri = client_uri
        if cert is not None and key is not None:
            await c.set_security(
                SecurityPolicyBasic256Sha256,
                str(cert),
                str(key),
                server_certificate=str(server_cert),
                mode=ua.MessageSecurityMode.SignAndEncrypt,
            )
            if identity:  # the session's user: the same certificate (an X509 identity token)
                await c.load_client_certificate(str(cert))
                await c.load_private_key(str(key))
        return c

    async def run(bridge: BridgeProcess) -> dict[str, Any]:
        url, ns = bridge.opcua_endpoint, bridge.namespace_index
        out: dict[str, Any] = {}
        trusted = await client(client_cert, client_key, identity=True, url=url)
        async with trusted:
            plc = OpcUaPlc(url, ns, line, client=trusted)
            out["trusted"] = await plc.read("Status.Fault", "Status.FaultCauses")
        for name, cert, key, identity in (
            ("anonymous, no security", None, None, False),
            ("trusted channel, anonymous session", client_cert, client_key, False),
            ("untrusted certificate", stranger_cert, stranger_key, True),
        ):
            c = await client(cert, key, identity=identity, url=url)
            try:
                await c.connect()
            except Exception as exc:  # refused: how depends on the stage (channel, session)
                out[name] = f"{type(exc).__name__}: {exc}"[:120]
            else:
                await c.disconnect()
                out[name] = "CONNECTED"
        return out

    with BridgeProcess(settings, tmp_path, name="bridge-secure") as bridge:
        out = asyncio.run(run(bridge))
    fault, causes = out.pop("trusted")
    assert (
        fault and causes & Fault.STARTING
    )  # read over Basic256Sha256 by the trusted PLC: divert, no daemon yet
    # Each refused where it should be: no unsecured endpoint at all; a trusted channel still needs a certificate
    # identity (anonymous is refused); a certificate outside trusted_clients gets no channel.
    assert "SecurityPolicy#None" in out["anonymous, no security"], out
    assert out["trusted channel, anonymous session"].startswith("BadIdentityTokenRejected"), out
    assert out["untrusted certificate"].startswith("BadCertificateUntrusted"), out
