"""The daemon's configuration: /etc/pitstop/pitstop.toml plus drop-ins, as frozen dataclasses.

The dataclasses below are the contract the rest of the daemon codes against. Parsing and validation
(`load`) fill them; every error names the file, the key and what is allowed (DaemonConfigError).
Per-device settings (device id, update server URL and token, identity key) are not here: factory
provisioning writes them to `<data_dir>/identity/` (image/provision.py), and `load` merges them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PATH = Path("/etc/pitstop/pitstop.toml")


@dataclass(frozen=True)
class LoopConfig:
    """One supervised inference loop ([[loop]] tables)."""

    name: str
    model: Path
    source: str = "synthetic:"
    sink: str = "-"
    source_opts: dict[str, str] = field(default_factory=dict)
    sink_opts: dict[str, str] = field(default_factory=dict)
    runtime: str = "auto"  # inference.choices.BACKENDS
    providers: tuple[str, ...] = ()  # empty: the runtime's default order
    precision: str = "fp32"
    threads: int = 0
    size: tuple[int, int] | None = None  # (height, width) for models with dynamic spatial dims
    gpu: int | None = None  # CUDA device index; None: CPU only, or the runtime's default device
    cpu_max: float | None = None  # CPU cores (cgroup cpu.max), None: unlimited
    memory_max: int | None = None  # bytes (cgroup memory.max, else RLIMIT_AS), None: unlimited
    restart_min_s: float = 1.0  # back-off after a crash: doubles from min to max, reset after a stable run
    restart_max_s: float = 60.0
    enabled: bool = True


@dataclass(frozen=True)
class HealthConfig:
    """[health]: what is sampled, where it goes."""

    interval_s: float = 30.0
    otlp_url: str | None = None  # e.g. https://site:4318/v1/metrics; None: no upstream push
    otlp_headers: dict[str, str] = field(default_factory=dict)
    otlp_timeout_s: float = 10.0
    spool_max_reports: int = 10_000  # bounded: when full the oldest go, counted and reported
    prometheus_listen: str | None = "127.0.0.1:9464"  # host:port, None: off
    partitions: tuple[Path, ...] = (Path("/"), Path("/data"), Path("/boot/efi"))


@dataclass(frozen=True)
class UpdateConfig:
    """[update]: the update agent and the health gate."""

    server: str | None = None  # hawkBit DDI base URL; from <data>/identity/upstream.toml when unset
    tenant: str = "DEFAULT"
    controller_id: str | None = None  # default: the provisioned device id, else the host name
    token: str | None = None  # TargetToken; from <data>/identity/upstream.toml when unset
    gateway_token: str | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None  # mTLS; default: <data>/identity/device.pem and device.key if present
    client_key: Path | None = None
    poll_default_s: float = 300.0  # used until the server says otherwise; never below 30 s
    reboot: str = "immediate"  # immediate | window | manual
    maintenance_window: str | None = None  # "HH:MM-HH:MM" local time, for reboot = "window"
    gate_deadline_s: float = 300.0
    gate_required_units: tuple[str, ...] = ()
    gate_throughput_fraction: float = 0.8  # each loop must reach this fraction of its pre-update throughput


@dataclass(frozen=True)
class DaemonConfig:
    path: Path = DEFAULT_PATH  # the main file; drop-ins from <path>.d/*.toml in name order
    bus: str = "system"  # system | session (development)
    control_group: str = "pitstop"  # members (and root) may call mutating D-Bus methods
    state_dir: Path = Path("/data/pitstop/daemon")
    log_level: str = "info"
    watchdog: bool = True
    health: HealthConfig = field(default_factory=HealthConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    loops: tuple[LoopConfig, ...] = ()
