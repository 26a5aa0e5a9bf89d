from pathlib import Path

from bundlekit import Keys, make_bundle, mixed_data, rootfs_payload, run_cli


def test_cli_roundtrip(tmp_path: Path, keys: Keys, capsys) -> None:
    data = mixed_data(3_000_000)
    b = make_bundle(tmp_path / "b.pitb", [rootfs_payload(tmp_path / "r.img", data)], keys)
    r = run_cli(capsys, "bundle", "verify", "--keyring", keys.keyring, b)
    assert r.rc == 0, r.err
    r = run_cli(capsys, "bundle", "extract", "--keyring", keys.keyring, b, "rootfs", "-o", tmp_path / "out")
    assert r.rc == 0, r.err
    assert (tmp_path / "out").read_bytes() == data
