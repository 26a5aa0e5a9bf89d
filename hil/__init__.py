"""pitstop.hil: the hardware-in-loop rig (see issue: HIL rig)."""
