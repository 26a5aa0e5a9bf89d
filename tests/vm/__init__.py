"""QEMU boot-test harness: a minimal A/B UEFI disk image built from real parts, booted under TCG.

The image is what DESIGN.md describes, shrunk to what a boot test needs: GPT with an ESP (standalone
GRUB EFI, the project's ``ota/grub/grub.cfg``, ``grubenv``, ``pitstop-platform.cfg``), two ext4 slots
holding ``/vmlinuz`` (a Debian cloud kernel, see ``./dev env``) and ``/initrd.img`` (static busybox and
an ``/init`` that reports the slot on the serial console), and a small data partition.

- ``kernel``: locate the cached Debian kernel and check it can talk on ttyS0.
- ``initramfs``: the guest, a newc cpio written in Python.
- ``disk``: filesystem images, the GPT layout, assembly, loop devices and ESP access.
- ``grub``: the standalone EFI binary, the platform file, grubenv inside a disk image.
- ``qemu``: run a VM with serial capture, a hard timeout and regex waits.
- ``image``: all of the above composed into the A/B test image.
"""
