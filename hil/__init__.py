"""pitstop.hil: the hardware-in-the-loop rig (docs/hil.md), a pytest plugin (`pytest hil/ --target qemu`).

- target.py: the device as a scenario sees it (`Target`, `Provision`); qemu_target.py, ssh_target.py,
  local_target.py: the kinds of device;
- console.py: serial consoles (QEMU's stdio, a serial device, a TCP serial server, a command); shell.py: a root
  shell on one; qmp.py: QEMU's monitor; power.py, hooks.py: power control and the bench's other hooks;
- timeline.py, report.py: what happened to each device, and the run's report;
- plugin.py: options, fixtures, the report's bookkeeping; overlay.py: the rig image's development hooks.
"""
