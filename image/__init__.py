"""pitstop.image: disk images from recipes (docs/recipes.md, docs/image.md).

- ``recipe``: the recipe schema, one declarative settings table (parsing, validation, JSON, docs);
  ``settings``: the table machinery.
- ``sizes``: byte sizes as recipes write them.
- ``partitions``: the GPT layout and its deterministic identifiers.
- ``ext4``, ``esp``: filesystem images without mounting (mkfs.ext4 -d, mkfs.vfat + mtools, grub-mkimage).
- ``datafs``: the data partition's initial tree.
- ``rootfs``: the root filesystem: mmdebstrap (cached), the recipe's configuration, pitstop, the slot image.
- ``systemconf``: ``/etc/pitstop/system.toml`` for an image.
- ``disk``: the disk image: GPT on a plain file, partition images copied in at their offsets (sparse).
- ``sparse``, ``bmap``: mapped ranges of sparse files and bmaptool's block map format.
- ``blockdev``, ``flash``: writing an image to a disk safely, verified.
- ``provision``: per-device identity written into the data partition without mounting.
- ``cli``: ``pitstop image …``.
"""
