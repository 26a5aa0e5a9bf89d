"""Recipes: the schema table, validation before anything is built, the JSON round trip (golden), the docs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from bundlekit import assert_refused
from imagekit import RECIPE, image_cli_run, write_recipe

from pitstop.image import recipe
from pitstop.image.errors import RecipeError
from pitstop.image.sizes import GiB, MiB, format_size, parse_size

REPO = Path(__file__).resolve().parent.parent
IPC = REPO / "recipes" / "ipc-x86_64.toml"

# The test recipe (imagekit.RECIPE) as JSON: every default filled in, sizes in bytes, paths absolute
# (@BASE@ is the recipe's directory). A change here is a change of the recipe format: update docs/recipes.md.
GOLDEN = """\
{
  "base": {
    "components": [
      "main"
    ],
    "mirror": "http://deb.debian.org/debian",
    "security_mirror": "http://deb.debian.org/debian-security",
    "snapshot": null,
    "suite": "bookworm"
  },
  "boot": {
    "cmdline": "console=ttyS0,115200 panic=1",
    "emergency_reboot_s": 30,
    "tries": 3
  },
  "bundle": {
    "security_version": 4,
    "version": "1.2.3"
  },
  "daemon": {
    "config": "@BASE@/pitstop.toml",
    "enable": true
  },
  "description": "a test image",
  "files": {
    "overlay": "@BASE@/overlay"
  },
  "keys": {
    "clock": "floor",
    "keyring": "@BASE@/keyring.pem"
  },
  "model": [
    {
      "description_file": "@BASE@/models/det.toml",
      "name": "det",
      "source": "@BASE@/models/det.onnx",
      "target": "models/det"
    }
  ],
  "name": "small",
  "network": {
    "interface": [
      {
        "address": [],
        "dhcp": true,
        "dns": [],
        "gateway": null,
        "match": "en*"
      }
    ],
    "ntp": [
      "ntp.example.com"
    ]
  },
  "packages": {
    "include": [
      "systemd",
      "openssh-server"
    ]
  },
  "partitions": {
    "data": 25165824,
    "disk": null,
    "esp": 16777216,
    "rootfs": 33554432
  },
  "ssh": {
    "password_authentication": false,
    "permit_root_login": "no"
  },
  "system": {
    "hostname": "dev-{device_id}",
    "persistent_journal": true,
    "timezone": "Etc/UTC"
  },
  "target": {
    "arch": "x86_64",
    "board": "generic-uefi",
    "bootloader": "grub",
    "compatible": "pitstop-test-image"
  },
  "user": [
    {
      "groups": [
        "sudo"
      ],
      "name": "maint",
      "shell": "/bin/bash",
      "ssh_keys": [
        "@BASE@/keys/operator.pub"
      ],
      "uid": null
    }
  ]
}
"""


@pytest.fixture
def recipe_dir(tmp_path: Path) -> Path:
    write_recipe(tmp_path)
    return tmp_path


def load_text(directory: Path, text: str) -> recipe.Recipe:
    return recipe.load(write_recipe(directory, text, name="r.toml"))


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# --- the shipped recipe -------------------------------------------------------------------------------------


def test_ipc_recipe_is_valid() -> None:
    r = recipe.load(IPC)
    assert r.target.compatible == "pitstop-ipc-x86_64"
    assert {"systemd", "openssh-server", "chrony", "python3", "linux-image-amd64"} <= set(r.packages.include)
    assert r.system.persistent_journal and r.daemon.enable and r.keys.development
    layout = r.layout()
    assert [p.name for p in layout.partitions] == ["esp", "rootfs_a", "rootfs_b", "data"]
    assert layout.size == 8 * GiB
    assert layout.part("data").end == layout.size - MiB  # "fill": up to the backup GPT's MiB
    assert r.files.overlay is not None and (r.files.overlay / "etc/systemd/journald.conf.d").is_dir()


def test_check_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    r = image_cli_run(monkeypatch, capsys, "image", "check", IPC)
    assert r.rc == 0, r.err
    assert "ok: ipc-x86_64, compatible pitstop-ipc-x86_64" in r.out and "development keyring" in r.out
    r = image_cli_run(monkeypatch, capsys, "image", "check", "--json", IPC)
    assert json.loads(r.out)["partitions"]["data"] == "fill"

    bad = write_recipe(tmp_path, RECIPE.replace('esp = "16MiB"', 'esp = "16MiB"\nswap = "1GiB"'))
    r = image_cli_run(monkeypatch, capsys, "image", "check", bad)
    assert_refused(r, 30)
    assert f"{bad}: partitions: unknown key 'swap'" in r.err


# --- JSON: golden and round trip ----------------------------------------------------------------------------


def test_json_golden(recipe_dir: Path) -> None:
    r = recipe.load(recipe_dir / "small.toml")
    assert recipe.dumps(r) == GOLDEN.replace("@BASE@", str(recipe_dir))


def test_json_round_trip(recipe_dir: Path) -> None:
    for path in (recipe_dir / "small.toml", IPC):
        r = recipe.load(path)
        data = json.loads(recipe.dumps(r))
        assert recipe.from_json(data) == r
        assert recipe.to_json(recipe.from_json(data)) == data


def test_json_is_validated_like_a_recipe(recipe_dir: Path) -> None:
    data = recipe.to_json(recipe.load(recipe_dir / "small.toml"))
    data["boot"]["tries"] = "3"
    with pytest.raises(RecipeError, match=r"^JSON: boot\.tries: must be an integer, not a string$"):
        recipe.from_json(data)
    data["boot"]["tries"] = 3
    data["model"][0]["source"] = str(recipe_dir / "gone.onnx")
    with pytest.raises(RecipeError, match=r"^JSON: model\[1\]\.source: .* does not exist$"):
        recipe.from_json(data)


def test_defaults_fill_a_minimal_recipe(tmp_path: Path) -> None:
    r = load_text(
        tmp_path,
        """name = "m"
[target]
compatible = "x"
[partitions]
rootfs = "64MiB"
data = "32MiB"
[keys]
keyring = "dev"
[bundle]
version = "0.1.0"
""",
    )
    assert r.partitions.esp == 64 * MiB and r.partitions.disk is None
    assert r.layout().size == (1 + 64 + 64 + 64 + 32 + 1) * MiB
    assert r.boot.tries == 3 and "panic=5" in r.boot.cmdline and r.boot.emergency_reboot_s == 30
    assert r.user == () and r.model == () and r.network.interface == ()
    assert r.files.overlay is None and r.keys.keyring == "dev" and r.bundle.security_version == 0


# --- validation: every problem found before anything is built, naming file, key and what is allowed ---------

BAD = [
    # unknown keys, with a suggestion
    (
        "unknown top-level key",
        ('name = "small"', 'name = "small"\nnmae = "x"'),
        r"unknown key 'nmae' \(did you mean 'name'\?\); allowed: name, description, target",
    ),
    (
        "unknown key in a table",
        ("tries = 3", "tries = 3\ntimeout = 5"),
        r"boot: unknown key 'timeout'; allowed: cmdline, tries, emergency_reboot_s$",
    ),
    (
        "unknown key in an array of tables",
        ('groups = ["sudo"]', 'groups = ["sudo"]\npassword = "x"'),
        r"user\[1\]: unknown key 'password'",
    ),
    ("unknown table", ("[files]", "[filez]\n[files]"), r"unknown key 'filez' \(did you mean 'files'\?\)"),
    # wrong types
    ("string for integer", ("tries = 3", 'tries = "3"'), r"boot\.tries: must be an integer, not a string"),
    ("boolean for integer", ("tries = 3", "tries = true"), r"boot\.tries: must be an integer, not a boolean"),
    ("integer for string", ('hostname = "dev-{device_id}"', "hostname = 7"), r"system\.hostname: must be a string"),
    (
        "string for array",
        ('include = ["systemd", "openssh-server"]', 'include = "systemd"'),
        r"packages\.include: must be an array, not a string",
    ),
    (
        "table for value",
        ('compatible = "pitstop-test-image"', "compatible = {a = 1}"),
        r"target\.compatible: must be a string, not a table",
    ),
    ("value for table", ('name = "small"', 'name = "small"\nssh = 1'), r"ssh: must be a table, not an integer"),
    (
        "array element type",
        ('ntp = ["ntp.example.com"]', 'ntp = ["ntp.example.com", 5]'),
        r"network\.ntp\[2\]: must be a string, not an integer",
    ),
    # values out of range or not allowed
    ("tries 0", ("tries = 3", "tries = 0"), r"boot\.tries: 0 is out of range \(1 … 9\)"),
    ("tries 10", ("tries = 3", "tries = 10"), r"boot\.tries: 10 is out of range \(1 … 9\)"),
    (
        "emergency reboot negative",
        ("tries = 3", "tries = 3\nemergency_reboot_s = -1"),
        r"boot\.emergency_reboot_s: -1 is out of range \(0 … 600\)$",
    ),
    (
        "emergency reboot too late",
        ("tries = 3", "tries = 3\nemergency_reboot_s = 601"),
        r"boot\.emergency_reboot_s: 601 is out of range \(0 … 600\)$",
    ),
    (
        "emergency reboot a string",
        ("tries = 3", 'tries = 3\nemergency_reboot_s = "30s"'),
        r"boot\.emergency_reboot_s: must be an integer, not a string$",
    ),
    (
        "emergency reboot a boolean",
        ("tries = 3", "tries = 3\nemergency_reboot_s = false"),
        r"boot\.emergency_reboot_s: must be an integer, not a boolean$",
    ),
    (
        "emergency reboot a float",
        ("tries = 3", "tries = 3\nemergency_reboot_s = 30.0"),
        r"boot\.emergency_reboot_s: must be an integer, not (a )?float$",
    ),
    (
        "arch",
        ('compatible = "pitstop-test-image"', 'compatible = "pitstop-test-image"\narch = "riscv64"'),
        r"target\.arch: 'riscv64' is not allowed \(allowed: 'x86_64', 'arm64'\)",
    ),
    (
        "suite",
        ('components = ["main"]', 'components = ["main"]\nsuite = "stable"'),
        r"base\.suite: 'stable' is not allowed \(allowed: 'bookworm'\)",
    ),
    (
        "component",
        ('components = ["main"]', 'components = ["main", "universe"]'),
        r"base\.components\[2\]: 'universe' is not allowed",
    ),
    (
        "duplicate list item",
        ('components = ["main"]', 'components = ["main", "main"]'),
        r'base\.components\[2\]: "main" is listed twice',
    ),
    (
        "snapshot",
        ('components = ["main"]', 'components = ["main"]\nsnapshot = "2024-06-01"'),
        r"base\.snapshot: '2024-06-01' is not allowed: a snapshot.debian.org timestamp, YYYYMMDDTHHMMSSZ",
    ),
    (
        "mirror",
        ('components = ["main"]', 'components = ["main"]\nmirror = "ftp://x"'),
        r"base\.mirror: 'ftp://x' is not allowed: an http:// or https:// URL",
    ),
    (
        "package name",
        ('include = ["systemd", "openssh-server"]', 'include = ["Systemd"]'),
        r"packages\.include\[1\]: 'Systemd' is not allowed: a Debian package name",
    ),
    (
        "compatible with a space",
        ('compatible = "pitstop-test-image"', 'compatible = "pitstop test"'),
        r"target\.compatible: 'pitstop test' is not allowed: 1-128 printable ASCII",
    ),
    ("name", ('name = "small"', 'name = "Small Image"'), r"name: 'Small Image' is not allowed: lower-case"),
    ("version", ('version = "1.2.3"', 'version = "1.2"'), r"bundle\.version: invalid version '1\.2'"),
    ("security_version", ("security_version = 4", "security_version = -1"), r"bundle\.security_version: -1 is out"),
    (
        "clock",
        ('keyring = "keyring.pem"', 'keyring = "keyring.pem"\nclock = "ntp"'),
        r"keys\.clock: 'ntp' is not allowed \(allowed: 'system', 'floor', 'none'\)",
    ),
    # kernel command line
    (
        "cmdline without panic",
        ('cmdline = "console=ttyS0,115200 panic=1"', 'cmdline = "console=ttyS0,115200"'),
        r"boot\.cmdline: needs panic=N with N > 0",
    ),
    (
        "cmdline panic=0",
        ('cmdline = "console=ttyS0,115200 panic=1"', 'cmdline = "panic=0"'),
        r"boot\.cmdline: needs panic=N",
    ),
    (
        "cmdline root=",
        ('cmdline = "console=ttyS0,115200 panic=1"', 'cmdline = "root=/dev/sda2 panic=1"'),
        r"boot\.cmdline: may not set root=…",
    ),
    (
        "cmdline quote",
        ('cmdline = "console=ttyS0,115200 panic=1"', """cmdline = 'panic=1 x="y"'"""),
        r"boot\.cmdline: may not contain '\"' \(it is set in a GRUB script\)",
    ),
    # host name, users, network
    (
        "hostname field",
        ('hostname = "dev-{device_id}"', 'hostname = "dev-{serial}"'),
        r"system\.hostname: unknown field \{serial\} \(allowed: \{device_id\}\)",
    ),
    (
        "hostname chars",
        ('hostname = "dev-{device_id}"', 'hostname = "Dev_{device_id}"'),
        r"system\.hostname: 'Dev_\{device_id\}' is not allowed: a host name",
    ),
    ("reserved user", ('name = "maint"', 'name = "root"'), r"user\[1\]\.name: 'root' is a system account"),
    (
        "duplicate user",
        ('ssh_keys = ["keys/operator.pub"]', 'ssh_keys = ["keys/operator.pub"]\n[[user]]\nname = "maint"'),
        r"user\[2\]: 'maint' appears twice",
    ),
    ("uid", ('name = "maint"', 'name = "maint"\nuid = 0'), r"user\[1\]\.uid: 0 is out of range \(1000 … 59999\)"),
    (
        "static without address",
        ('match = "en*"', 'match = "en*"\ndhcp = false'),
        r"network\.interface\[1\]\.address: is required when dhcp = false",
    ),
    (
        "address without prefix",
        ('match = "en*"', 'match = "en*"\naddress = ["10.0.0.2"]'),
        r"network\.interface\[1\]\.address\[1\]: '10\.0\.0\.2' needs a prefix length",
    ),
    (
        "bad gateway",
        ('match = "en*"', 'match = "en*"\naddress = ["10.0.0.2/24"]\ngateway = "10.0.0"'),
        r"network\.interface\[1\]\.gateway: '10\.0\.0' is not an IP address",
    ),
    # sizes and partitions that do not fit
    ("size unit", ('esp = "16MiB"', 'esp = "16MB!"'), r"partitions\.esp: '16MB!' is not a size"),
    (
        "size alignment",
        ('esp = "16MiB"', 'esp = "16.5MiB"'),
        r"partitions\.esp: '16\.5MiB' is not a whole number of MiB",
    ),
    ("size too small", ('esp = "16MiB"', 'esp = "8MiB"'), r"partitions\.esp: '8MiB' is too small \(at least 16MiB\)"),
    ("size type", ('esp = "16MiB"', "esp = true"), r"partitions\.esp: must be a size such as \"64MiB\""),
    (
        "partitions do not fit",
        ('data = "24MiB"', 'data = "24MiB"\ndisk = "64MiB"'),
        r"partitions\.disk: 64MiB is too small: esp 16MiB \+ 2 x rootfs 32MiB \+ data 24MiB "
        r"\+ 2MiB for the GPT = 106MiB",
    ),
    (
        "fill leaves too little",
        ('data = "24MiB"', 'data = "fill"\ndisk = "90MiB"'),
        r"partitions\.disk: 90MiB is too small: .* leave 8MiB for data \(at least 16MiB\)",
    ),
    ("fill without disk", ('data = "24MiB"', 'data = "fill"'), r'partitions\.data: "fill" needs partitions\.disk'),
    ("required size", ('rootfs = "32MiB"\n', ""), r"partitions\.rootfs: is required"),
    (
        "required compatible",
        ('compatible = "pitstop-test-image"\n', ""),
        r"target\.compatible: is required \(string: What the device is: written to system\.toml, put into",
    ),
    (
        "required table",
        ('[bundle]\nversion = "1.2.3"\nsecurity_version = 4\n', ""),
        r"bundle\.version: is required \(string: Version of the image's rootfs and of its first bundle",
    ),
    # models
    (
        "model target reserved",
        ('source = "models/det.onnx"', 'source = "models/det.onnx"\ntarget = "pitstop/x"'),
        r"model\[1\]\.target: 'pitstop/x' is reserved on the data partition",
    ),
    (
        "model target escapes",
        ('source = "models/det.onnx"', 'source = "models/det.onnx"\ntarget = "../x"'),
        r"model\[1\]\.target: model target '\.\./x' has an empty, '\.' or '\.\.' component",
    ),
    (
        "model targets overlap",
        (
            'source = "models/det.onnx"',
            'source = "models/det.onnx"\ntarget = "m"\n[[model]]\n'
            'name = "b"\nsource = "models/det.onnx"\ntarget = "m/b"',
        ),
        r"model\[2\]\.target: 'm/b' overlaps the target 'm' of another model",
    ),
    (
        "model description not TOML",
        ('description_file = "models/det.toml"', 'description_file = "overlay/etc/motd"'),
        r"model\[1\]\.description_file: 'overlay/etc/motd': not valid TOML",
    ),
]


@pytest.mark.parametrize(("old_new", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_recipe_is_refused(tmp_path: Path, old_new: tuple[str, str], message: str) -> None:
    text = edit(RECIPE, *old_new)
    path = write_recipe(tmp_path, text, name="bad.toml")
    with pytest.raises(RecipeError) as e:
        recipe.load(path)
    assert e.value.exit_code == 30
    assert e.value.message.startswith(f"{path}: "), e.value.message
    assert "\n" not in e.value.message
    assert re.search(message, e.value.message), e.value.message


MISSING = [
    (
        "overlay directory",
        ('overlay = "overlay"', 'overlay = "nope"'),
        r"files\.overlay: 'nope' \(.*/nope\) does not exist",
    ),
    (
        "overlay is a file",
        ('overlay = "overlay"', 'overlay = "pitstop.toml"'),
        r"files\.overlay: .* is not a directory$",
    ),
    (
        "keyring",
        ('keyring = "keyring.pem"', 'keyring = "keys/ring.pem"'),
        r"keys\.keyring: 'keys/ring\.pem' .* does not exist",
    ),
    (
        "ssh key file",
        ('ssh_keys = ["keys/operator.pub"]', 'ssh_keys = ["keys/op.pub"]'),
        r"user\[1\]\.ssh_keys\[1\]: 'keys/op\.pub' \(.*\) does not exist",
    ),
    (
        "model file",
        ('source = "models/det.onnx"', 'source = "models/yolo.onnx"'),
        r"model\[1\]\.source: 'models/yolo\.onnx' .* does not exist",
    ),
    (
        "model description",
        ('description_file = "models/det.toml"', 'description_file = "models/yolo.toml"'),
        r"model\[1\]\.description_file: 'models/yolo\.toml' .* does not exist",
    ),
    ("daemon config", ('config = "pitstop.toml"', 'config = "pitstop.conf"'), r"daemon\.config: 'pitstop\.conf'"),
]


@pytest.mark.parametrize(("old_new", "message"), [m[1:] for m in MISSING], ids=[m[0] for m in MISSING])
def test_missing_file_is_refused(tmp_path: Path, old_new: tuple[str, str], message: str) -> None:
    path = write_recipe(tmp_path, edit(RECIPE, *old_new), name="bad.toml")
    with pytest.raises(RecipeError) as e:
        recipe.load(path)
    assert re.search(rf"^{re.escape(str(path))}: {message}", e.value.message), e.value.message


def test_file_contents_are_checked(tmp_path: Path) -> None:
    path = write_recipe(tmp_path)
    (tmp_path / "keys" / "operator.pub").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n")
    with pytest.raises(
        RecipeError,
        match=r"user\[1\]\.ssh_keys\[1\]: 'keys/operator\.pub': key 1 is not an OpenSSH "
        r"public key line .* never a private key",
    ):
        recipe.load(path)
    write_recipe(tmp_path)
    (tmp_path / "keyring.pem").write_text("not a certificate\n")
    with pytest.raises(RecipeError, match=r"keys\.keyring: 'keyring\.pem': keyring .* holds no valid PEM certificate"):
        recipe.load(path)
    (tmp_path / "keyring.pem").unlink()
    write_recipe(tmp_path)
    (tmp_path / "pitstop.toml").write_text("poll = \n")
    with pytest.raises(RecipeError, match=r"daemon\.config: 'pitstop\.toml': not valid TOML"):
        recipe.load(path)


def test_paths_are_relative_to_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_recipe(tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    r = recipe.load(Path("recipes/small.toml"))
    assert r.files.overlay == tmp_path / "recipes" / "overlay"
    assert r.model[0].source == tmp_path / "recipes" / "models" / "det.onnx"
    assert path.parent / "keyring.pem" == r.keys.keyring
    assert set(r.files_used()) >= {r.model[0].source, r.user[0].ssh_keys[0], tmp_path / "recipes" / "pitstop.toml"}


def test_unreadable_recipe(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"nope\.toml: cannot read the recipe"):
        recipe.load(tmp_path / "nope.toml")
    (tmp_path / "x.toml").write_text("name = \n")
    with pytest.raises(RecipeError, match=r"x\.toml: not valid TOML"):
        recipe.load(tmp_path / "x.toml")


# --- small parts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("64MiB", 64 * MiB),
        ("64M", 64 * MiB),
        ("1.5G", 1536 * MiB),
        ("2GiB", 2 * GiB),
        ("512", 512),
        ("4 KiB", 4096),
        ("1T", 1 << 40),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1M", "1MB", "0.3B", "1.0000001K", "M", "1 2M"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a"):
        parse_size(text)


def test_format_size() -> None:
    assert [format_size(n) for n in (64 * MiB, 1536 * MiB, 8 * GiB, 1000, 0)] == [
        "64MiB",
        "1536MiB",
        "8GiB",
        "1000",
        "0",
    ]


def test_render_hostname() -> None:
    assert recipe.render_hostname("ipc-{device_id}", "SN.2024_0042") == "ipc-sn-2024-0042"
    assert recipe.render_hostname("{device_id}", "-a-") == "a"
    assert len(recipe.render_hostname("ipc-{device_id}", "x" * 64)) == 63
    assert recipe.render_hostname("gateway", "A1") == "gateway"


# --- the docs are generated from the table -----------------------------------------------------------------


def test_docs_reference_is_current() -> None:
    doc = (REPO / "docs" / "recipes.md").read_text()
    assert recipe.splice_docs(doc) == doc, (
        "docs/recipes.md is out of date with image/recipe.py: run "
        "`.venv/bin/python -m pitstop.image.recipe docs/recipes.md`"
    )


def test_docs_name_every_key() -> None:
    docs = recipe.render_docs()
    for table in [recipe.RECIPE, *(t for _, t, _ in recipe.tables(recipe.RECIPE))]:
        for s in table.settings:
            assert f"`{s.key}`" in docs or f"`[{s.key}]`" in docs or f"`[[{s.key}]]`" in docs or s.key in docs
    assert "### `[[network.interface]]`" in docs and "### `[partitions]`" in docs
