"""`pitstop server` under a fleet: one server process, --devices simulated devices (default 1,000) each polling
(DDI) and posting an OTLP health report every --interval seconds (default 30 s), on this machine.

Issue target: one server process handles >= 1,000 devices polling every 30 s and reporting health: the
required rate is devices x 2 requests / interval (66.7 requests/s for 1,000 devices at 30 s). The figures:
requests/s handled, p50/p99 latency, and the capacity against that required rate.

Set-up (not timed): development keys and a small bundle made by the real CLI (`pitstop keys create-dev`,
`pitstop bundle create`); a data directory with the devices registered (each its own token), the bundle
uploaded and deployed to --deploy-percent of them (default 10 %), so that the steady phase also carries
deployments and feedback. Then `pitstop server serve` starts as a subprocess on a loopback port; the load
generator runs in this process (asyncio, one keep-alive connection per device, requests written and answers
parsed by hand), so generator and server are separate processes sharing this machine's cores.

Each device sends what the daemon sends: `GET /DEFAULT/controller/v1/<id>` with `Authorization: TargetToken`
(when the answer has a deploymentBase link: `GET` it and `POST` feedback `proceeding`, at the next poll
`closed`/`success`), and half an interval later `POST /v1/metrics`, a real `ExportMetricsServiceRequest`
encoded by the daemon's own encoder from a health sample of this machine (its `pitstop.report.seq` counting
up, so the server stores every report as it would a device's). Artifacts are not downloaded (that is
bandwidth, not request handling).

Phases:
1. steady: every device at its cadence, devices spread evenly over the interval (random phase), for
   --duration seconds (default 90 s: three rounds). The honest figure for the issue: the rate the fleet
   asks for, the latency it sees, and the server's CPU while doing it.
2. saturation: every device sends its next request as soon as the previous one is answered (no think time),
   for --saturate seconds (default 20): the most requests/s the server handles with all the devices
   connected; its ratio to the required rate is the capacity headroom. The generator competes with the
   server for the same cores here; its own CPU is shown.

Every latency is measured by the generator from just before a request is written to the end of its answer.
Server CPU is utime + stime of the server process (/proc/PID/stat) over the phase.

Usage:  .venv/bin/python benchmarks/server_load.py [--devices 1000] [--interval 30] [--duration 90] [--json]

Exits 0 whatever the verdict (benchmarks report, tests judge); non-zero only when it could not measure.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import CommandFailed, bench_main, log, machine, pitstop_command

from pitstop.daemon.health import HealthSampler
from pitstop.daemon.otlp import SEQ_ATTR, SPOOL_ATTR, encode, resource_attributes
from pitstop.hil.errors import HilError
from pitstop.hil.site import SiteServer

TENANT = "DEFAULT"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--devices", type=int, default=1000, help="simulated devices (default 1000)")
    p.add_argument(
        "--interval",
        type=float,
        default=30.0,
        help="seconds between a device's polls, and between its reports (default 30)",
    )
    p.add_argument("--duration", type=float, default=90.0, help="steady phase, seconds (default 90)")
    p.add_argument("--saturate", type=float, default=20.0, help="saturation phase, seconds (default 20; 0: skip)")
    p.add_argument("--deploy-percent", type=float, default=10.0, help="devices given a deployment (default 10)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="where the work directory is made")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--pitstop", help="pitstop executable (default: the one next to this Python)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)
    if args.devices < 1 or args.interval <= 0 or args.duration <= 0:
        p.error("--devices, --interval and --duration must be positive")
    return args


# -- set-up ---------------------------------------------------------------------------------------------------


def _run(argv: list[str]) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise CommandFailed(argv, res.returncode, res.stderr)
    return res.stdout


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, str]]:
    """The data directory with the devices, the bundle uploaded and deployed; {device: token}."""
    from pitstop.ota.server import artifacts, auth, deployments, devices  # noqa: PLC0415
    from pitstop.ota.server.store import Store  # noqa: PLC0415

    pitstop = pitstop_command(args.pitstop)
    keys = work / "keys"
    _run([*pitstop, "keys", "create-dev", str(keys)])
    payload = work / "rootfs.img"
    payload.write_bytes(os.urandom(256 << 10))
    bundle = work / "fleet-2.0.0.pitb"
    _run(
        [
            *pitstop,
            "-q",
            "bundle",
            "create",
            "-o",
            str(bundle),
            "--version",
            "2.0.0",
            "--security-version",
            "1",
            "--compatible",
            "bench",
            "--payload",
            f"rootfs:rootfs:{payload}",
            "--key",
            str(keys / "signing.key"),
            "--cert",
            str(keys / "chain.pem"),
        ]
    )
    data = work / "server"
    rng = random.Random(1)
    tokens = {f"dev-{i:05d}": f"{rng.getrandbits(128):032x}" for i in range(args.devices)}
    with Store(data) as store:

        def add_all(c: Any, now: float) -> None:
            for dev, tok in tokens.items():
                devices.add(c, now, dev, group="fleet", token_hash=auth.hash_token(tok))

        store.write(add_all)
        dist = artifacts.upload(store, bundle, keyring=keys / "keyring.pem").distribution
        if args.deploy_percent > 0:
            spec = deployments.RolloutSpec(target="fleet", devices=list(tokens), percent=args.deploy_percent)
            store.write(lambda c, now: deployments.create_rollout(c, now, dist, spec))
    return data, tokens


def start_server(args: argparse.Namespace, data: Path) -> SiteServer:
    """`pitstop server serve` on a loopback port, its log in server.log beside the data; CommandFailed if not."""
    server = SiteServer(
        data,
        command=pitstop_command(args.pitstop),
        verbose=False,
        poll_interval=f"{max(1, round(args.interval))}s",
        log=data.parent / "server.log",
    )
    try:
        return server.start()
    except HilError as e:
        assert server.proc is not None
        raise CommandFailed(server.argv, server.proc.returncode or -1, str(e)) from e


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


# -- the simulated fleet --------------------------------------------------------------------------------------


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, seconds: float) -> None:
        self.latencies.setdefault(kind, []).append(seconds)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class Device:
    """One device: a keep-alive connection, its token, its report and what its deployment needs."""

    def __init__(self, dev: str, token: str, host: str, port: int, report: Any) -> None:
        self.dev, self.host, self.port = dev, host, port
        self.auth = f"Authorization: TargetToken {token}\r\n".encode()
        self.root = f"/{TENANT}/controller/v1/{dev}"
        self.report = report  # ExportMetricsServiceRequest, its seq attribute set per send
        self.seq = 0
        self.pending_close: str | None = None  # an action to close at the next poll
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, method: str, path: str, body: bytes = b"", ctype: str = "") -> tuple[int, bytes]:
        if self.writer is None:
            await self._connect()
        assert self.reader is not None and self.writer is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n".encode() + self.auth
        if body:
            head += f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n".encode()
        self.writer.write(head + b"\r\n" + body)
        try:
            resp = await self.reader.readuntil(b"\r\n\r\n")
            status = int(resp[9:12])
            i = resp.find(b"Content-Length: ")
            n = int(resp[i + 16 : resp.index(b"\r\n", i)]) if i >= 0 else 0
            data = await self.reader.readexactly(n) if n else b""
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            self.close()
            raise
        if b"Connection: close" in resp:
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def poll(self, stats: Stats) -> None:
        t0 = time.perf_counter()
        status, body = await self.request("GET", self.root)
        stats.add("poll", time.perf_counter() - t0)
        if status != 200:
            stats.error(f"poll {status}")
            return
        if b"deploymentBase" not in body:
            return
        href = json.loads(body)["_links"]["deploymentBase"]["href"]
        action = href.split("/deploymentBase/")[1].split("?")[0]
        if self.pending_close == action:
            await self._feedback(stats, action, "closed", "success")
            self.pending_close = None
            return
        t0 = time.perf_counter()
        status, _ = await self.request("GET", f"{self.root}/deploymentBase/{action}")
        stats.add("deploymentBase", time.perf_counter() - t0)
        if status != 200:
            stats.error(f"deploymentBase {status}")
        await self._feedback(stats, action, "proceeding", "none")
        self.pending_close = action

    async def _feedback(self, stats: Stats, action: str, execution: str, finished: str) -> None:
        body = json.dumps(
            {
                "timestamp": int(time.time() * 1000),
                "status": {
                    "execution": execution,
                    "result": {"finished": finished},
                    "details": [f"bench: {execution}"],
                },
            }
        ).encode()
        t0 = time.perf_counter()
        status, _ = await self.request(
            "POST", f"{self.root}/deploymentBase/{action}/feedback", body, "application/json"
        )
        stats.add("feedback", time.perf_counter() - t0)
        if status != 200:
            stats.error(f"feedback {status}")

    async def push(self, stats: Stats) -> None:
        self.seq += 1
        for kv in self.report.resource_metrics[0].scope_metrics[0].scope.attributes:
            if kv.key == SEQ_ATTR:
                kv.value.int_value = self.seq
        body = self.report.SerializeToString()
        t0 = time.perf_counter()
        status, _ = await self.request("POST", "/v1/metrics", body, "application/x-protobuf")
        stats.add("otlp", time.perf_counter() - t0)
        if status != 200:
            stats.error(f"otlp {status}")


async def _guarded(stats: Stats, coro: Any) -> None:
    try:
        await coro
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        stats.error(type(e).__name__)


async def steady(fleet: list[Device], interval: float, duration: float, stats: Stats) -> float:
    """Each device polls every `interval` and reports half an interval later, from a random phase."""
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.5
    end = start + duration
    rng = random.Random(2)

    async def run(d: Device, phase: float) -> None:
        k = 0
        while True:
            t_poll = start + phase + k * interval
            for t, action in ((t_poll, d.poll), (t_poll + interval / 2, d.push)):
                if t >= end:
                    return
                await asyncio.sleep(max(0.0, t - loop.time()))
                await _guarded(stats, action(stats))
            k += 1

    await asyncio.gather(*(run(d, rng.uniform(0, interval)) for d in fleet))
    return duration


async def saturate(fleet: list[Device], duration: float, stats: Stats) -> float:
    """Every device sends its next request as soon as the previous one is answered."""
    loop = asyncio.get_running_loop()
    end = loop.time() + duration

    async def run(d: Device) -> None:
        while loop.time() < end:
            await _guarded(stats, d.poll(stats))
            if loop.time() < end:
                await _guarded(stats, d.push(stats))

    t0 = loop.time()
    await asyncio.gather(*(run(d) for d in fleet))
    return loop.time() - t0


def summary(stats: Stats, wall: float, cpu_server: float, cpu_gen: float) -> dict[str, Any]:
    every = [x for v in stats.latencies.values() for x in v]

    def q(xs: list[float], p: float) -> float:
        return (
            round(statistics.quantiles(xs, n=1000, method="inclusive")[int(p * 1000) - 1] * 1000, 2)
            if len(xs) > 1
            else round((xs or [0.0])[0] * 1000, 2)
        )

    return {
        "wall_s": round(wall, 2),
        "requests": len(every),
        "requests_per_s": round(len(every) / wall, 1),
        "p50_ms": q(every, 0.5),
        "p99_ms": q(every, 0.99),
        "max_ms": round(max(every, default=0.0) * 1000, 1),
        "by_kind": {
            k: {"requests": len(v), "p50_ms": q(v, 0.5), "p99_ms": q(v, 0.99)}
            for k, v in sorted(stats.latencies.items())
        },
        "errors": dict(stats.errors),
        "server_cpu_percent_of_one_core": round(cpu_server / wall * 100, 1),
        "generator_cpu_percent_of_one_core": round(cpu_gen / wall * 100, 1),
    }


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def drive(args: argparse.Namespace, url: str, tokens: dict[str, str], pid: int) -> dict[str, Any]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sample = HealthSampler([Path("/")]).sample()
    fleet = []
    for dev, tok in tokens.items():
        res = resource_attributes(host_name=dev, device_id=dev, version="0.1.0", booted_slot="a")
        report = encode([sample], res, start_ns=time.time_ns(), scope_attributes={SEQ_ATTR: 0, SPOOL_ATTR: dev})
        fleet.append(Device(dev, tok, host, int(port), report))
    out: dict[str, Any] = {"report_bytes": len(fleet[0].report.SerializeToString())}
    phases: list[tuple[str, Callable[[Stats], Awaitable[float]]]] = [
        ("steady", lambda st: steady(fleet, args.interval, args.duration, st))
    ]
    if args.saturate > 0:
        phases.append(("saturation", lambda st: saturate(fleet, args.saturate, st)))
    for name, phase in phases:
        log(
            f"{name}: {len(fleet)} devices"
            + (
                f", every {args.interval:g} s for {args.duration:g} s"
                if name == "steady"
                else f" without pause for {args.saturate:g} s"
            )
        )
        stats = Stats()
        c0, g0 = cpu_seconds(pid), _own_cpu()
        wall = await phase(stats)
        out[name] = summary(stats, wall, cpu_seconds(pid) - c0, _own_cpu() - g0)
        out[name]["server"] = proc_status(pid)
        log(
            f"{name}: {out[name]['requests_per_s']} req/s, p50 {out[name]['p50_ms']} ms, "
            f"p99 {out[name]['p99_ms']} ms, errors {out[name]['errors'] or 'none'}"
        )
    for d in fleet:
        d.close()
    return out


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import resource as res  # noqa: PLC0415

    soft, hard = res.getrlimit(res.RLIMIT_NOFILE)
    if soft < args.devices + 256:
        res.setrlimit(res.RLIMIT_NOFILE, (min(hard, args.devices + 256), hard))
    log(f"set-up: {args.devices} devices, a bundle deployed to {args.deploy_percent:g} % of them")
    load_before = os.getloadavg()
    data, tokens = prepare(args, work)
    server = start_server(args, data)
    assert server.proc is not None
    try:
        results = asyncio.run(drive(args, server.url("127.0.0.1"), tokens, server.proc.pid))
    finally:
        server_exit = server.stop(30)
    required = args.devices * 2 / args.interval
    with_rollout = subprocess.run(
        [*pitstop_command(args.pitstop), "server", "rollouts", "--json", "--data", str(data)],
        capture_output=True,
        text=True,
        check=False,
    )
    rollouts = json.loads(with_rollout.stdout) if with_rollout.returncode == 0 else []
    results.update(
        {
            "benchmark": "server_load",
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": machine(),
            "devices": args.devices,
            "interval_s": args.interval,
            "required_requests_per_s": round(required, 1),
            "deployments": rollouts[0]["actions"] if rollouts else {},
            "server_exit": server_exit,
            # Other work on the machine shares its cores with the server and the generator: say how much.
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        }
    )
    if "saturation" in results:
        results["capacity_ratio"] = round(results["saturation"]["requests_per_s"] / required, 1)
    steady_r = results["steady"]
    cpu = steady_r["server_cpu_percent_of_one_core"]
    results["cpu_estimate_requests_per_s_per_core"] = round(steady_r["requests_per_s"] / (cpu / 100)) if cpu else None
    return results


def table(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"server_load  {r['date']}  {r['devices']} devices, a poll and an OTLP report each every {r['interval_s']:g} s"
        f"  (required {r['required_requests_per_s']} req/s)",
        f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; load average before "
        f"{r['load_average_before'][0]}, after {r['load_average_after'][0]}; OTLP report {r['report_bytes']} bytes",
        "",
        f"{'phase':<12} {'wall s':>7} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'errors':>7} {'server CPU':>11} {'generator CPU':>14} {'threads':>8} {'RSS MiB':>8}",
    ]
    for name in ("steady", "saturation"):
        p = r.get(name)
        if p is None:
            continue
        lines.append(
            f"{name:<12} {p['wall_s']:>7} {p['requests']:>9} {p['requests_per_s']:>8} {p['p50_ms']:>8} "
            f"{p['p99_ms']:>8} {p['max_ms']:>8} {sum(p['errors'].values()):>7} "
            f"{p['server_cpu_percent_of_one_core']:>10}% "
            f"{p['generator_cpu_percent_of_one_core']:>13}% {p['server'].get('Threads', 0):>8} "
            f"{p['server'].get('VmRSS', 0) / 1024:>8.0f}"
        )
        for kind, k in p["by_kind"].items():
            lines.append(f"  {kind:<22} {k['requests']:>9} {'':>8} {k['p50_ms']:>8} {k['p99_ms']:>8}")
    lines.append("")
    st = r["steady"]
    failed = sum(st["errors"].values())
    lines.append(
        f"steady: {st['requests']} requests in {st['wall_s']:g} s ({st['requests_per_s']} req/s; the first "
        f"and last round are partial), {'all answered' if not failed else f'{failed} FAILED'}, "
        f"p99 {st['p99_ms']} ms, server at {st['server_cpu_percent_of_one_core']}% of one core"
    )
    if "capacity_ratio" in r:
        lines.append(
            f"capacity: {r['saturation']['requests_per_s']} req/s at saturation = {r['capacity_ratio']}x the "
            f"required {r['required_requests_per_s']} req/s"
        )
    if r["deployments"]:
        lines.append(f"deployments during the run: {r['deployments']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return bench_main("server_load", parse_args(argv), run, table)


if __name__ == "__main__":
    sys.exit(main())
