"""The rig's development hooks for an image: an extra overlay (`pitstop image build --extra-overlay`) applied
after the recipe's own, so the product recipe stays as it ships.

- A root shell on the serial console: agetty logs root in by itself, so the rig types commands there
  (hil/shell.py) without SSH keys, network or a password. Never put this in a product image.
- An inference loop (a daemon configuration drop-in) on a model the rig preloads (`rig_models`): updates are
  gated on inference, as on a product device, and the rig measures how soon a device serves again.
"""

from __future__ import annotations

from pathlib import Path

from pitstop.hil.errors import HilError
from pitstop.image.recipe import Model
from pitstop.inference.test_models import ORIENTATION, locate

# The console the kernel and GRUB use per architecture (recipes' boot.cmdline: console=ttyS0 on x86_64).
SERIAL_TTY = {"x86_64": "ttyS0", "aarch64": "ttyAMA0"}

AUTOLOGIN = """\
# pitstop HIL rig (hil/overlay.py): a root shell on the serial console. Development images only.
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 %I $TERM
"""


# The loop the rig runs. Paced below what an emulated CPU manages (one 224x224 classification takes about a
# second under TCG on one vCPU: ONNX Runtime's vector kernels are emulated), so that its throughput is the
# pace and the health gate compares like with like.
LOOP_NAME = "orientation"
LOOP_FPS = 0.5
LOOP_DROPIN = Path("etc/pitstop/pitstop.toml.d") / "50-hil-inference.toml"
MODEL_TARGET = f"models/{LOOP_NAME}"


def loop_dropin(model_file: str) -> str:
    return f"""\
# pitstop HIL rig (hil/overlay.py): an inference loop on the model the rig preloads, on synthetic frames.
[[loop]]
name = "{LOOP_NAME}"
model = "/data/{MODEL_TARGET}/{model_file}"
source = "synthetic:"
source_opts = {{ width = 256, height = 256, fps = {LOOP_FPS} }}
sink = "jsonl:/dev/null"
runtime = "onnxruntime"
providers = ["cpu"]
threads = 1

[update]
# The gate of a bad update fails at its deadline: shorter than the default (300 s) to keep scenarios short,
# still ample for a loop to come up in an emulated device's first boot of a slot.
gate_deadline_s = 180
"""


def rig_models() -> tuple[Model, ...]:
    """The models the rig preloads: the orientation classifier (a real ONNX model from the test models)."""
    found = locate(ORIENTATION)
    return (Model(LOOP_NAME, found.model, MODEL_TARGET, found.description),)


def autologin_dropin(tty: str) -> Path:
    """Where the drop-in lives inside the rootfs."""
    return Path("etc/systemd/system") / f"serial-getty@{tty}.service.d" / "autologin.conf"


def write_rig_overlay(dest: Path, *, arch: str = "x86_64") -> Path:
    """Write the rig's overlay tree into `dest` (made if missing) and return it."""
    tty = SERIAL_TTY.get(arch)
    if tty is None:
        raise HilError(f"no serial console known for {arch}")
    path = dest / autologin_dropin(tty)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(AUTOLOGIN)
    loop = dest / LOOP_DROPIN
    loop.parent.mkdir(parents=True, exist_ok=True)
    loop.write_text(loop_dropin(rig_models()[0].source.name))
    return dest
