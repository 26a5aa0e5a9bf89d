"""daemon/config.py: the daemon's configuration file, its drop-ins, the identity merge, the JSON form, what a reload
applies, and the docs generated from the tables."""

from __future__ import annotations

import json
import os
import socket
from datetime import time as Time
from pathlib import Path

import pytest

from pitstop.daemon import config
from pitstop.daemon.config import DaemonConfig, HealthConfig, LoopConfig, UpdateConfig
from pitstop.daemon.errors import DaemonConfigError

REPO = Path(__file__).resolve().parent.parent

FULL = """
bus = "session"
control_group = "operators"
state_dir = "/var/lib/pitstop"
log_level = "debug"
watchdog = false

[health]
interval_s = 15
otlp_url = "https://site.example:4318/v1/metrics"
otlp_headers = { Authorization = "Bearer abc" }
otlp_timeout_s = 2.5
spool_max_reports = 500
prometheus_listen = "[::1]:9100"
partitions = ["/", "/data"]

[update]
server = "https://hawkbit.example"
tenant = "acme"
controller_id = "gw-0042"
token = "s3cret"
ca_file = "/etc/ssl/site-ca.pem"
client_cert = "/etc/pitstop/client.pem"
client_key = "/etc/pitstop/client.key"
poll_default_s = 60
reboot = "window"
maintenance_window = "22:30-04:00"
gate_deadline_s = 120
gate_required_units = ["ssh.service", "network-online.target"]
gate_throughput_fraction = 0.5

[[loop]]
name = "text-det"
model = "/data/models/det.onnx"
source = "rtsp://cam1/stream"
sink = "mqtts://broker:8883/det"
source_opts = { fps = 10, loop = true, transport = "tcp" }
sink_opts = { qos = 1 }
runtime = "onnxruntime"
providers = ["cuda", "cpu"]
precision = "fp16"
threads = 4
size = "640x480"
gpu = 0
cpu_max = 1.5
memory_max = "1.5G"
restart_min_s = 2
restart_max_s = 120
enabled = false

[[loop]]
name = "orient"
model = "/data/models/orient.onnx"
size = [224, 224]
memory_max = 536870912
"""


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(path: Path, data_dir: Path) -> DaemonConfig:
    return config.load(path, data_dir=data_dir)


# --- values -------------------------------------------------------------------------------------------------


def test_missing_file_means_defaults(tmp_path: Path, data_dir: Path) -> None:
    cfg = load(tmp_path / "pitstop.toml", data_dir)
    assert cfg == DaemonConfig(
        path=tmp_path / "pitstop.toml",
        state_dir=data_dir / "pitstop" / "daemon",
        health=HealthConfig(partitions=(Path("/"), data_dir, Path("/boot/efi"))),
        update=UpdateConfig(controller_id=socket.gethostname()),
        data_dir=data_dir,
    )


def test_defaults_with_the_standard_data_dir(tmp_path: Path) -> None:
    # With data_dir /data the derived defaults are the dataclasses' own.
    cfg = config.loads("", tmp_path / "pitstop.toml")
    assert cfg == DaemonConfig(path=tmp_path / "pitstop.toml")


def test_full_file(tmp_path: Path, data_dir: Path) -> None:
    cfg = load(write(tmp_path / "pitstop.toml", FULL), data_dir)
    assert (cfg.bus, cfg.control_group, cfg.state_dir, cfg.log_level, cfg.watchdog) == (
        "session",
        "operators",
        Path("/var/lib/pitstop"),
        "debug",
        False,
    )
    assert cfg.health == HealthConfig(
        interval_s=15.0,
        otlp_url="https://site.example:4318/v1/metrics",
        otlp_headers={"Authorization": "Bearer abc"},
        otlp_timeout_s=2.5,
        spool_max_reports=500,
        prometheus_listen="[::1]:9100",
        partitions=(Path("/"), Path("/data")),
    )
    assert cfg.update == UpdateConfig(
        server="https://hawkbit.example",
        tenant="acme",
        controller_id="gw-0042",
        token="s3cret",
        ca_file=Path("/etc/ssl/site-ca.pem"),
        client_cert=Path("/etc/pitstop/client.pem"),
        client_key=Path("/etc/pitstop/client.key"),
        poll_default_s=60.0,
        reboot="window",
        maintenance_window="22:30-04:00",
        gate_deadline_s=120.0,
        gate_required_units=("ssh.service", "network-online.target"),
        gate_throughput_fraction=0.5,
    )
    assert cfg.loops == (
        LoopConfig(
            name="text-det",
            model=Path("/data/models/det.onnx"),
            source="rtsp://cam1/stream",
            sink="mqtts://broker:8883/det",
            source_opts={"fps": "10", "loop": "true", "transport": "tcp"},
            sink_opts={"qos": "1"},
            runtime="onnxruntime",
            providers=("cuda", "cpu"),
            precision="fp16",
            threads=4,
            size=(640, 480),
            gpu=0,
            cpu_max=1.5,
            memory_max=1536 << 20,
            restart_min_s=2.0,
            restart_max_s=120.0,
            enabled=False,
        ),
        LoopConfig(name="orient", model=Path("/data/models/orient.onnx"), size=(224, 224), memory_max=512 << 20),
    )
    assert cfg.loop("orient") is cfg.loops[1] and cfg.loop("nope") is None


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("2g", 2 << 30),
        ("64MiB", 64 << 20),
        ("1T", 1 << 40),
        ("40000000", 40000000),
    ],
)
def test_memory_sizes(tmp_path: Path, text: str, size: int) -> None:
    cfg = config.loads(f'[[loop]]\nname = "a"\nmodel = "/m.onnx"\nmemory_max = "{text}"\n', tmp_path / "p.toml")
    assert cfg.loops[0].memory_max == size


def test_reference_recipe_config_loads(data_dir: Path) -> None:
    cfg = load(REPO / "recipes" / "ipc-x86_64" / "pitstop.toml", data_dir)
    assert cfg.loops == () and cfg.bus == "system"


# --- drop-ins -----------------------------------------------------------------------------------------------

MAIN = """
log_level = "info"
[health]
interval_s = 10
otlp_url = "https://a.example/v1/metrics"
otlp_headers = { A = "1", B = "2" }
[[loop]]
name = "det"
model = "/m/det.onnx"
cpu_max = 2.0
[[loop]]
name = "cls"
model = "/m/cls.onnx"
"""


def test_dropins_merge_in_name_order(tmp_path: Path, data_dir: Path) -> None:
    main = write(tmp_path / "pitstop.toml", MAIN)
    d = tmp_path / "pitstop.toml.d"
    write(d / "20-later.toml", "[health]\ninterval_s = 30\n")
    write(d / "10-first.toml", '[health]\ninterval_s = 20\notlp_headers = { C = "3" }\n')
    # Byte order of names, as systemd sorts: "1…" before "9…" whatever the numbers say.
    write(d / "9-last.toml", 'log_level = "warning"\n')
    write(d / "50-loops.toml", '[[loop]]\nname = "det"\ncpu_max = 0.5\n[[loop]]\nname = "new"\nmodel = "/m/new.onnx"\n')
    write(d / "README", "not toml, ignored")
    write(d / ".hidden.toml", "garbage = = =")
    write(d / "60-off.toml.disabled", "garbage = = =")
    cfg = load(main, data_dir)
    assert cfg.log_level == "warning"
    # Tables merge key by key: otlp_url from the main file, interval_s from the last drop-in setting it.
    assert cfg.health.interval_s == 30.0
    assert cfg.health.otlp_url == "https://a.example/v1/metrics"
    # A table-valued key is one value: replaced, not merged.
    assert cfg.health.otlp_headers == {"C": "3"}
    # A [[loop]] of a known name changes that loop key by key; a new name is added after the main file's.
    assert [lp.name for lp in cfg.loops] == ["det", "cls", "new"]
    assert cfg.loops[0] == LoopConfig(name="det", model=Path("/m/det.onnx"), cpu_max=0.5)
    assert config.dropins(main) == [d / "10-first.toml", d / "20-later.toml", d / "50-loops.toml", d / "9-last.toml"]


def test_dropin_unsets_with_empty_string_and_disables_a_loop(tmp_path: Path, data_dir: Path) -> None:
    main = write(tmp_path / "pitstop.toml", MAIN)
    write(
        tmp_path / "pitstop.toml.d" / "off.toml",
        '[health]\notlp_url = ""\nprometheus_listen = ""\n[[loop]]\nname = "det"\ncpu_max = ""\nenabled = false\n',
    )
    cfg = load(main, data_dir)
    assert cfg.health.otlp_url is None and cfg.health.prometheus_listen is None
    assert cfg.loops[0].cpu_max is None and not cfg.loops[0].enabled


def test_dropins_apply_without_a_main_file(tmp_path: Path, data_dir: Path) -> None:
    write(tmp_path / "pitstop.toml.d" / "a.toml", 'bus = "session"\n')
    assert load(tmp_path / "pitstop.toml", data_dir).bus == "session"


def test_error_in_a_dropin_names_the_dropin(tmp_path: Path, data_dir: Path) -> None:
    main = write(tmp_path / "pitstop.toml", MAIN)
    bad = write(tmp_path / "pitstop.toml.d" / "10-limits.toml", '[[loop]]\nname = "det"\ncpu_max = "2"\n')
    with pytest.raises(DaemonConfigError) as e:
        load(main, data_dir)
    assert e.value.message == f"{bad}: loop[det].cpu_max: must be a number, not a string"


def test_cross_key_error_names_the_file_that_set_the_key(tmp_path: Path, data_dir: Path) -> None:
    main = write(tmp_path / "pitstop.toml", MAIN)
    bad = write(tmp_path / "pitstop.toml.d" / "r.toml", '[[loop]]\nname = "cls"\nrestart_min_s = 90\n')
    with pytest.raises(DaemonConfigError) as e:
        load(main, data_dir)
    assert e.value.message == (
        f"{bad}: loop[cls].restart_min_s: restart_max_s (60) must be at least restart_min_s (90)"
    )
    # A loop a drop-in adds without a model: the drop-in is named.
    write(tmp_path / "pitstop.toml.d" / "r.toml", '[[loop]]\nname = "extra"\n')
    with pytest.raises(DaemonConfigError) as e:
        load(main, data_dir)
    assert e.value.message == f"{bad}: loop[extra].model: is required (an absolute path: the model file)"


# --- errors -------------------------------------------------------------------------------------------------

LOOP = '[[loop]]\nname = "text-det"\nmodel = "/m.onnx"\n'

ERRORS = [
    (
        "nmae = 1",
        "unknown key 'nmae'; allowed: bus, control_group, state_dir, log_level, watchdog, health, update, loop",
    ),
    ("lop = []", "unknown key 'lop' (did you mean 'loop'?); allowed: bus, control_group"),
    (
        "[health]\nintervall_s = 3",
        "health: unknown key 'intervall_s' (did you mean 'interval_s'?); allowed: interval_s",
    ),
    (LOOP + "cpu = 1", "loop[text-det]: unknown key 'cpu' (did you mean 'gpu'?); allowed: name, model,"),
    ("bus = 1", "bus: must be a string, not an integer"),
    ('bus = "user"', "bus: 'user' is not allowed (allowed: 'system', 'session')"),
    ('watchdog = "yes"', "watchdog: must be true or false, not a string"),
    ('state_dir = "var/lib"', "state_dir: 'var/lib' is not an absolute path"),
    ('control_group = "Ops Team"', "control_group: 'Ops Team' is not allowed: a group name"),
    ('log_level = "verbose"', "log_level: 'verbose' is not allowed (allowed: 'debug', 'info', 'warning', 'error'"),
    ("health = 1", "health: must be a table ([health]), not an integer"),
    ("[health]\ninterval_s = 0", "health.interval_s: 0 is out of range (1 … 86400)"),
    ("[health]\ninterval_s = nan", "health.interval_s: nan is out of range (1 … 86400)"),
    ("[health]\ninterval_s = true", "health.interval_s: must be a number, not a boolean"),
    ("[health]\nspool_max_reports = 1.5", "health.spool_max_reports: must be an integer, not a number"),
    ('[health]\notlp_url = "ftp://x"', "health.otlp_url: 'ftp://x' is not allowed: an http:// or https:// URL"),
    ('[health]\notlp_headers = { "Bad Name" = "x" }', "health.otlp_headers: 'Bad Name' is not allowed as a name"),
    ('[health]\notlp_headers = { A = "x\\ny" }', "health.otlp_headers.A: the value is not allowed: printable"),
    (
        '[health]\nprometheus_listen = "localhost"',
        "health.prometheus_listen: 'localhost' is not allowed: use HOST:PORT",
    ),
    (
        '[health]\nprometheus_listen = "[zz]:1"',
        "health.prometheus_listen: '[zz]:1' is not allowed: [zz] is not an IPv6",
    ),
    ('[health]\npartitions = ["/", "/"]', 'health.partitions[2]: "/" is listed twice'),
    ('[health]\npartitions = ["/", "data"]', "health.partitions[2]: 'data' is not an absolute path"),
    ("[update]\npoll_default_s = 10", "update.poll_default_s: 10 is out of range (30 … 604800)"),
    ("[update]\ngate_throughput_fraction = 0", "update.gate_throughput_fraction: 0 is out of range (> 0 and ≤ 1)"),
    ("[update]\ngate_throughput_fraction = 1.5", "update.gate_throughput_fraction: 1.5 is out of range (> 0 and ≤ 1)"),
    (
        "[update]\ngate_deadline_s = 20\ngate_hold_s = 20",
        "update.gate_hold_s: must be shorter than gate_deadline_s (20): the gate could never pass",
    ),
    ('[update]\nreboot = "later"', "update.reboot: 'later' is not allowed (allowed: 'immediate', 'window', 'manual')"),
    ('[update]\nreboot = "window"', 'update.maintenance_window: is required with reboot = "window" ("HH:MM-HH:MM"'),
    (
        '[update]\nmaintenance_window = "25:00-01:00"',
        "update.maintenance_window: '25:00-01:00' is not allowed: use HH:MM",
    ),
    (
        '[update]\nmaintenance_window = "02:00-02:00"',
        "update.maintenance_window: '02:00-02:00' is not allowed: use HH:MM",
    ),
    (
        '[update]\ngate_required_units = ["ssh"]',
        "update.gate_required_units[1]: 'ssh' is not allowed: systemd unit names",
    ),
    ('[update]\nserver = "hawkbit.example"', "update.server: 'hawkbit.example' is not allowed: an http:// or https://"),
    ('[update]\ncontroller_id = ""', "update.controller_id: '' is not allowed: 1-64 letters"),
    ('[update]\nclient_cert = "/c.pem"', "update.client_key: is required with client_cert (mTLS needs"),
    ('[update]\nclient_key = "/c.key"', "update.client_cert: is required with client_key (mTLS needs"),
    ('[update]\ntoken = "a"\ngateway_token = "b"', "update.gateway_token: set token or gateway_token, not both"),
    ("loop = 3", "loop: must be an array of tables ([[loop]]), not an integer"),
    ("[loop]\nname = 'x'", "loop: must be an array of tables ([[loop]]), not a table"),
    ('[[loop]]\nmodel = "/m.onnx"', "loop[1].name: is required: it identifies the loop"),
    (
        '[[loop]]\nname = "Text_Det"\nmodel = "/m"',
        "loop[1].name: 'Text_Det' is not allowed: lower-case letters, digits",
    ),
    ('[[loop]]\nname = "-x"\nmodel = "/m"', "loop[1].name: '-x' is not allowed"),
    (LOOP + LOOP, "loop[text-det]: defined twice in this file (loop names are unique)"),
    ('[[loop]]\nname = "text-det"', "loop[text-det].model: is required (an absolute path: the model file)"),
    ('[[loop]]\nname = "a"\nmodel = "models/a.onnx"', "loop[a].model: 'models/a.onnx' is not an absolute path"),
    (
        LOOP + 'runtime = "tensorflow"',
        "loop[text-det].runtime: 'tensorflow' is not allowed (allowed: 'auto', 'tensorrt'",
    ),
    (LOOP + 'providers = ["gpu"]', "loop[text-det].providers[1]: 'gpu' is not allowed (allowed: 'tensorrt', 'cuda'"),
    (LOOP + 'precision = "int4"', "loop[text-det].precision: 'int4' is not allowed (allowed: 'fp32'"),
    (LOOP + "threads = -1", "loop[text-det].threads: -1 is out of range (0 … 1024)"),
    (LOOP + 'size = "640"', 'loop[text-det].size: \'640\' is not allowed: use "HEIGHTxWIDTH", e.g. "640x640"'),
    (LOOP + "size = [640]", 'loop[text-det].size: must be "HEIGHTxWIDTH" or [height, width], not an array'),
    (LOOP + "size = [0, 640]", "loop[text-det].size: [0, 640]: height and width must be integers 1 … 16384"),
    (LOOP + "gpu = -1", "loop[text-det].gpu: -1 is out of range (0 … 63)"),
    (LOOP + "cpu_max = 0", "loop[text-det].cpu_max: 0 is out of range (0.01 … 1024)"),
    (LOOP + 'memory_max = "lots"', "loop[text-det].memory_max: 'lots' is not a size: use bytes, or a number with K"),
    (LOOP + "memory_max = 512", "loop[text-det].memory_max: 512 is out of range (at least 32M)"),
    (LOOP + "memory_max = true", 'loop[text-det].memory_max: must be a size such as "512M" or "2G"'),
    (LOOP + "source_opts = { fps = [1] }", "loop[text-det].source_opts.fps: must be a string, number or boolean"),
    (LOOP + 'source_opts = { FPS = "1" }', "loop[text-det].source_opts: 'FPS' is not allowed as a name"),
    (LOOP + 'source = ""', "loop[text-det].source: '' is not allowed: a source URI or path"),
    (LOOP + "restart_max_s = 0.5", "loop[text-det].restart_max_s: restart_max_s (0.5) must be at least restart_min_s"),
    (LOOP + "enabled = 1", "loop[text-det].enabled: must be true or false, not an integer"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS, ids=[m.split(":")[0] for _, m in ERRORS])
def test_errors_name_file_key_and_what_is_allowed(tmp_path: Path, data_dir: Path, text: str, message: str) -> None:
    path = write(tmp_path / "pitstop.toml", text + "\n")
    with pytest.raises(DaemonConfigError) as e:
        load(path, data_dir)
    assert e.value.message.startswith(f"{path}: {message}"), e.value.message
    assert e.value.exit_code == 50


def test_secrets_are_not_repeated_in_messages(tmp_path: Path, data_dir: Path) -> None:
    path = write(tmp_path / "pitstop.toml", '[update]\ntoken = "my secret"\n')
    with pytest.raises(DaemonConfigError) as e:
        load(path, data_dir)
    assert e.value.message == f"{path}: update.token: the value is not allowed: printable ASCII without spaces"


def test_file_level_errors(tmp_path: Path, data_dir: Path) -> None:
    path = write(tmp_path / "pitstop.toml", "bus = \n")
    with pytest.raises(DaemonConfigError, match=rf"^{path}: not valid TOML: "):
        load(path, data_dir)
    path.write_bytes(b"# \xff\n")
    with pytest.raises(DaemonConfigError, match=rf"^{path}: not UTF-8 text$"):
        load(path, data_dir)
    path.write_bytes(b"#" * (config.MAX_FILE + 1))
    with pytest.raises(DaemonConfigError, match=rf"^{path}: larger than 1048576 bytes"):
        load(path, data_dir)
    path.unlink()
    path.mkdir()
    with pytest.raises(DaemonConfigError, match=rf"^{path}: cannot read: Is a directory"):
        load(path, data_dir)


# --- identity -----------------------------------------------------------------------------------------------


def provision(
    data_dir: Path, *, device_id: str = "SN-0042", url: str = "https://hb.example", token: str = "tok"
) -> Path:
    """The files image/provision.py writes, in the form it writes them."""
    ident = data_dir / "identity"
    ident.mkdir(mode=0o700)
    write(ident / "device-id", f"{device_id}\n")
    write(ident / "upstream.toml", f"url = {json.dumps(url)}\ntoken = {json.dumps(token)}\n")
    write(ident / "device.pem", "-----BEGIN CERTIFICATE-----\n")
    write(ident / "device.key", "-----BEGIN PRIVATE KEY-----\n")
    return ident


def test_identity_gives_the_defaults(tmp_path: Path, data_dir: Path) -> None:
    ident = provision(data_dir)
    u = load(tmp_path / "pitstop.toml", data_dir).update
    assert (u.controller_id, u.server, u.token) == ("SN-0042", "https://hb.example", "tok")
    assert (u.client_cert, u.client_key) == (ident / "device.pem", ident / "device.key")


def test_configuration_wins_over_identity(tmp_path: Path, data_dir: Path) -> None:
    provision(data_dir)
    path = write(
        tmp_path / "pitstop.toml",
        '[update]\ncontroller_id = "bench-1"\nserver = "https://other.example"\ngateway_token = "gw"\n'
        'client_cert = "/etc/c.pem"\nclient_key = "/etc/c.key"\n',
    )
    u = load(path, data_dir).update
    assert (u.controller_id, u.server, u.token, u.gateway_token) == ("bench-1", "https://other.example", None, "gw")
    assert (u.client_cert, u.client_key) == (Path("/etc/c.pem"), Path("/etc/c.key"))
    # `""` is set too: no server at all, whatever the identity says.
    write(path, '[update]\nserver = ""\ntoken = ""\n')
    u = load(path, data_dir).update
    assert (u.server, u.token, u.controller_id) == (None, None, "SN-0042")


def test_provisioned_metrics_endpoint_gets_the_devices_token(tmp_path: Path, data_dir: Path) -> None:
    ident = provision(data_dir)
    with (ident / "upstream.toml").open("a") as f:
        f.write('metrics_url = "https://site.example/v1/metrics"\n')
    h = load(tmp_path / "pitstop.toml", data_dir).health
    assert h.otlp_url == "https://site.example/v1/metrics"
    assert h.otlp_headers == {"Authorization": "TargetToken tok"}
    # A collector configured in a file is never sent the provisioned token; a file's headers are kept.
    path = write(tmp_path / "pitstop.toml", '[health]\notlp_url = "https://collector.example/v1/metrics"\n')
    h = load(path, data_dir).health
    assert (h.otlp_url, h.otlp_headers) == ("https://collector.example/v1/metrics", {})
    write(path, '[health]\notlp_headers = { X-Site = "7" }\n')
    h = load(path, data_dir).health
    assert (h.otlp_url, h.otlp_headers) == ("https://site.example/v1/metrics", {"X-Site": "7"})
    write(path, '[health]\notlp_url = ""\n')
    assert load(path, data_dir).health.otlp_url is None
    write(ident / "upstream.toml", 'url = "https://hb.example"\nmetrics_url = "ftp://x"\n')
    with pytest.raises(DaemonConfigError, match=r"metrics_url: 'ftp://x' is not allowed"):
        load(tmp_path / "pitstop.toml", data_dir)


def test_check_flag_reads_what_the_daemon_would_and_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pitstop daemon --check`: what image builds run in the new rootfs on the recipe's configuration."""
    from pitstop.cli import main

    path = write(tmp_path / "pitstop.toml", '[update]\nreboot = "manual"\n')
    write(tmp_path / "pitstop.toml.d" / "50-site.toml", "[health]\ninterval_s = 5\n")
    assert main(["daemon", "--check", "--config", str(path)]) == 0
    assert capsys.readouterr().out == ""
    write(tmp_path / "pitstop.toml.d" / "60-bad.toml", '[update]\nreboot = "sometimes"\n')
    assert main(["daemon", "--check", "--config", str(path)]) == 50
    err = capsys.readouterr().err
    assert err.startswith(f"pitstop: error: {tmp_path / 'pitstop.toml.d' / '60-bad.toml'}") and "update.reboot" in err
    assert len(err.splitlines()) == 1


def test_identity_certificate_only_as_a_pair(tmp_path: Path, data_dir: Path) -> None:
    ident = provision(data_dir)
    (ident / "device.key").unlink()
    u = load(tmp_path / "pitstop.toml", data_dir).update
    assert (u.client_cert, u.client_key) == (None, None)


def test_partial_identity(tmp_path: Path, data_dir: Path) -> None:
    write(data_dir / "identity" / "device-id", "only-an-id\n")
    u = load(tmp_path / "pitstop.toml", data_dir).update
    assert (u.controller_id, u.server, u.token, u.client_cert) == ("only-an-id", None, None, None)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("device-id", "bad id\n", "'bad id' is not a device id (1-64 letters"),
        ("upstream.toml", "url = ", "not valid TOML"),
        ("upstream.toml", 'url = "ftp://x"', "url: 'ftp://x' is not allowed: an http:// or https:// URL"),
        ("upstream.toml", "token = 5", "token: must be a string, not an integer"),
    ],
)
def test_malformed_identity_names_the_file(
    tmp_path: Path, data_dir: Path, name: str, content: str, message: str
) -> None:
    ident = provision(data_dir)
    write(ident / name, content)
    with pytest.raises(DaemonConfigError) as e:
        load(tmp_path / "pitstop.toml", data_dir)
    assert e.value.message.startswith(f"{ident / name}: {message}"), e.value.message


def test_upstream_toml_keys_of_newer_provisioning_are_ignored(tmp_path: Path, data_dir: Path) -> None:
    ident = provision(data_dir)
    write(ident / "upstream.toml", 'url = "https://hb.example"\ntoken = "t"\ntenant = "later"\n')
    assert load(tmp_path / "pitstop.toml", data_dir).update.tenant == "DEFAULT"


def test_identity_file_that_cannot_be_read(tmp_path: Path, data_dir: Path) -> None:
    ident = provision(data_dir)
    (ident / "upstream.toml").unlink()
    (ident / "upstream.toml").mkdir()
    with pytest.raises(DaemonConfigError, match=rf"^{ident / 'upstream.toml'}: cannot read: Is a directory$"):
        load(tmp_path / "pitstop.toml", data_dir)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_identity_is_an_error(tmp_path: Path, data_dir: Path) -> None:
    ident = provision(data_dir)
    (ident / "upstream.toml").chmod(0)
    with pytest.raises(DaemonConfigError, match=rf"^{ident / 'upstream.toml'}: cannot read: Permission denied"):
        load(tmp_path / "pitstop.toml", data_dir)


# --- data_dir from the system configuration -----------------------------------------------------------------

SYSTEM = """
compatible = "pitstop-test"
data_dir = "{data}"
keyring = "/etc/pitstop/keyring.pem"
[bootloader]
backend = "grub"
grubenv = "/tmp/grubenv"
[[slot]]
name = "a"
device = "/dev/a"
[[slot]]
name = "b"
device = "/dev/b"
"""


def test_data_dir_from_the_system_configuration(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provision(data_dir, device_id="from-system-toml")
    monkeypatch.setenv("PITSTOP_CONFIG", str(write(tmp_path / "system.toml", SYSTEM.format(data=data_dir))))
    cfg = config.load(tmp_path / "pitstop.toml")
    assert cfg.data_dir == data_dir and cfg.state_dir == data_dir / "pitstop" / "daemon"
    assert cfg.update.controller_id == "from-system-toml"
    monkeypatch.setenv("PITSTOP_CONFIG", str(tmp_path / "no-system.toml"))
    assert config.system_data_dir() == Path("/data")


# --- reload -------------------------------------------------------------------------------------------------


def test_reload_diff() -> None:
    old = config.loads(FULL)
    assert config.reload_diff(old, old) == (set(), set())
    text = (
        FULL.replace("interval_s = 15", "interval_s = 20")
        .replace('bus = "session"', 'bus = "system"')
        .replace("poll_default_s = 60", "poll_default_s = 90")
        .replace('tenant = "acme"', 'tenant = "other"')
        .replace('log_level = "debug"', 'log_level = "info"')
        .replace('prometheus_listen = "[::1]:9100"', 'prometheus_listen = ""')
        .replace("cpu_max = 1.5", "cpu_max = 1.0")
        .replace('name = "orient"', 'name = "orient2"')
    )
    live, restart = config.reload_diff(old, config.loads(text))
    assert live == {
        "health.interval_s",
        "update.poll_default_s",
        "log_level",
        "loop[text-det]",
        "loop[orient]",
        "loop[orient2]",
    }
    assert restart == {"bus", "update.tenant", "health.prometheus_listen"}
    moved = config.loads(FULL, data_dir=Path("/mnt/data"))
    assert config.reload_diff(old, moved)[1] == {"data_dir"}


def test_reload_classes_match_the_design() -> None:
    # DESIGN: health, loops, update poll/policy live; bus, control_group, state_dir need a restart.
    live = {s.key for s in config.TOP.values if s.live}
    assert live == {"log_level"}
    assert {s.key for s in config.UPDATE.values if s.live} == {
        "poll_default_s",
        "reboot",
        "maintenance_window",
        "gate_deadline_s",
        "gate_required_units",
        "gate_throughput_fraction",
        "gate_hold_s",
    }
    assert {s.key for s in config.HEALTH.values if not s.live} == {"prometheus_listen"}
    assert all(s.live for s in config.LOOP.values)


# --- JSON form ----------------------------------------------------------------------------------------------


def test_as_dict_round_trips(tmp_path: Path, data_dir: Path) -> None:
    provision(data_dir)
    for text in ("", FULL):
        cfg = load(write(tmp_path / "pitstop.toml", text), data_dir)
        data = json.loads(json.dumps(config.as_dict(cfg, secrets=True)))
        assert config.from_dict(data) == cfg


def test_as_dict_of_the_defaults() -> None:
    # The golden form: a change here is a change of what `pitstop daemon config --json` and D-Bus clients see.
    cfg = DaemonConfig(update=UpdateConfig(controller_id="dev-1"))
    assert config.as_dict(cfg) == {
        "path": "/etc/pitstop/pitstop.toml",
        "data_dir": "/data",
        "bus": "system",
        "control_group": "pitstop",
        "state_dir": "/data/pitstop/daemon",
        "log_level": "info",
        "watchdog": True,
        "health": {
            "interval_s": 30.0,
            "otlp_url": None,
            "otlp_headers": {},
            "otlp_timeout_s": 10.0,
            "spool_max_reports": 10000,
            "prometheus_listen": "127.0.0.1:9464",
            "partitions": ["/", "/data", "/boot/efi"],
        },
        "update": {
            "server": None,
            "tenant": "DEFAULT",
            "controller_id": "dev-1",
            "token": None,
            "gateway_token": None,
            "ca_file": None,
            "client_cert": None,
            "client_key": None,
            "poll_default_s": 300.0,
            "reboot": "immediate",
            "maintenance_window": None,
            "gate_deadline_s": 300.0,
            "gate_required_units": [],
            "gate_throughput_fraction": 0.8,
            "gate_hold_s": 15.0,
            "delta": True,
        },
        "loop": [],
    }
    assert config.from_dict(config.as_dict(cfg)) == cfg


def test_as_dict_redacts_secrets() -> None:
    cfg = config.loads(FULL)
    data = config.as_dict(cfg)
    assert data["update"]["token"] == "(redacted)" and data["health"]["otlp_headers"] == {"Authorization": "(redacted)"}
    assert data["update"]["gateway_token"] is None
    assert data["loop"][0]["size"] == [640, 480] and data["loop"][0]["memory_max"] == 1536 << 20
    assert "s3cret" not in json.dumps(data) and "Bearer" not in json.dumps(data)


def test_from_dict_validates() -> None:
    base = config.as_dict(DaemonConfig(), secrets=True)
    with pytest.raises(DaemonConfigError, match=r"^JSON: bus: must be a string, not null$"):
        config.from_dict({**base, "bus": None})
    with pytest.raises(DaemonConfigError, match=r"^JSON: unknown key 'extra'"):
        config.from_dict({**base, "extra": 1})
    with pytest.raises(DaemonConfigError, match=r"^JSON: path: 'rel' is not an absolute path$"):
        config.from_dict({**base, "path": "rel"})
    with pytest.raises(DaemonConfigError, match=r"^x: must be an object, not an array$"):
        config.from_dict([], "x")


# --- maintenance windows ------------------------------------------------------------------------------------


def test_windows() -> None:
    assert config.parse_window("01:00-04:30") == (Time(1, 0), Time(4, 30))
    assert config.in_window("01:00-04:30", Time(1, 0))
    assert not config.in_window("01:00-04:30", Time(4, 30))
    assert config.in_window("22:00-02:00", Time(23, 59)) and config.in_window("22:00-02:00", Time(0, 30))
    assert not config.in_window("22:00-02:00", Time(12, 0))
    for bad in ["1:00-2:00", "01:00-24:00", "01:00", "02:00-02:00", "01:00 - 02:00"]:
        with pytest.raises(ValueError):
            config.parse_window(bad)


# --- docs ---------------------------------------------------------------------------------------------------


def test_docs_reference_is_current() -> None:
    doc = (REPO / "docs" / "daemon-config.md").read_text()
    assert config.splice_docs(doc) == doc, (
        "docs/daemon-config.md is out of date with daemon/config.py: run "
        "`.venv/bin/python -m pitstop.daemon.config docs/daemon-config.md`"
    )


def test_docs_name_every_key() -> None:
    docs = config.render_docs()
    for table in (config.TOP, config.HEALTH, config.UPDATE, config.LOOP):
        for s in table.values:
            assert f"| `{s.key}` |" in docs
    for header in ("### `[health]`", "### `[update]`", "### `[[loop]]`"):
        assert header in docs
