"""`pytest hil/ --target qemu`: the rig's scenarios run with the rig's plugin (docs/hil.md)."""

pytest_plugins = ["pitstop.hil.plugin"]
