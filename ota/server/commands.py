"""`pitstop server …`: what each command does (the arguments are in cli.py). Management commands work on the
data directory directly, while `serve` runs or not: SQLite lets one writer at a time in and readers always."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pitstop.errors import InputError, UsageError
from pitstop.ota.server import auth, deployments, devices, views
from pitstop.ota.server import rollout as waves
from pitstop.ota.server.errors import DeployError, StoreError
from pitstop.ota.server.records import Distribution
from pitstop.ota.server.store import Store, set_meta
from pitstop.ota.server.window import Window
from pitstop.progress import Progress, human_size


def _store(args: argparse.Namespace, *, create: bool = False) -> Store:
    return Store(args.data, create=create, readers=1)


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=False))


def _note(text: str) -> None:
    sys.stderr.write(text + "\n")


def cmd_serve(args: argparse.Namespace) -> int:
    from pitstop.ota.server.serve import ServeOptions, serve  # noqa: PLC0415

    return serve(
        ServeOptions(
            data=args.data,
            listen=args.listen,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            client_ca=args.client_ca,
            tenant=args.tenant,
            poll_interval=args.poll_interval,
            auto_register=args.auto_register,
            public_url=args.public_url,
            keyring=args.keyring,
            health_history=args.health_history,
        )
    )


# -- devices --------------------------------------------------------------------------------------------------


def _new_token(given: str | None) -> str:
    return auth.check_token(given) if given is not None else auth.generate_token()


def cmd_device_add(args: argparse.Namespace) -> int:
    if args.no_token and args.token:
        raise UsageError("give --token or --no-token, not both")
    devices.check_id(args.id)
    token = None if args.no_token else _new_token(args.token)
    with _store(args, create=True) as store:
        store.write(
            lambda c, now: devices.add(
                c, now, args.id, group=args.group, token_hash=auth.hash_token(token) if token else None
            )
        )
    _note(
        f"device {args.id} added"
        + (f" to group {args.group}" if args.group else "")
        + ("" if token else " without a token (gateway token or client certificate)")
    )
    if token:
        print(token)
    return 0


def cmd_device_token(args: argparse.Namespace) -> int:
    token = _new_token(args.token)
    with _store(args) as store:
        store.write(lambda c, _now: devices.set_token(c, args.id, auth.hash_token(token)))
    _note(f"device {args.id} has a new token; the old one no longer works")
    print(token)
    return 0


def cmd_device_group(args: argparse.Namespace) -> int:
    group = None if args.group == "-" else args.group
    with _store(args) as store:
        store.write(lambda c, _now: devices.set_group(c, args.id, group))
    return 0


def cmd_device_remove(args: argparse.Namespace) -> int:
    def remove(c: Any, now: float) -> None:
        for rollout_id in devices.remove(c, args.id):
            deployments.advance(c, now, rollout_id)

    with _store(args) as store:
        store.write(remove)
    _note(f"device {args.id} removed")
    return 0


def _versions(c: Any) -> dict[int, str]:
    return {int(r[0]): str(r[1]) for r in c.execute("SELECT id, version FROM distributions")}


def cmd_device_list(args: argparse.Namespace) -> int:
    with _store(args) as store, store.reading() as c:
        devs = devices.list_devices(c, args.group)
        latest = deployments.latest_actions(c)
        versions = _versions(c)
        now = store.now()
    if args.json:
        _print_json([views.device_json(d, latest.get(d.id), versions, now) for d in devs])
        return 0
    rows = [
        [
            d.id,
            d.group or "-",
            d.version or "-",
            d.booted_slot or "-",
            views.ago(d.last_seen, now),
            views.health_text(d.health, d.health_time, now),
            views.deployment_text(latest.get(d.id), versions),
        ]
        for d in devs
    ]
    print(views.table(["DEVICE", "GROUP", "VERSION", "SLOT", "LAST SEEN", "HEALTH", "DEPLOYMENT"], rows))
    return 0


def cmd_device_show(args: argparse.Namespace) -> int:
    with _store(args) as store, store.reading() as c:
        d = devices.require(c, args.id)
        actions = deployments.device_actions(c, args.id)
        histories = {a.id: deployments.history(c, a.id) for a in actions[:5]}
        health = devices.health_history(c, args.id, 10)
        versions = _versions(c)
        now = store.now()
    latest = next((a for a in actions if a.status.open), actions[0] if actions else None)
    if args.json:
        doc = views.device_json(d, latest, versions, now)
        doc["actions"] = [
            views.action_json(a, versions) | {"history": [views.history_json(e) for e in histories.get(a.id, [])]}
            for a in actions
        ]
        doc["health_history"] = [{"time": views.iso(t), **h} for t, h in health]
        _print_json(doc)
        return 0
    print(f"device {d.id}" + (f" (group {d.group})" if d.group else ""))
    print(
        f"  version {d.version or '-'}, slot {d.booted_slot or '-'}, last seen {views.ago(d.last_seen, now)}"
        + (f" from {d.last_address}" if d.last_address else "")
    )
    print(f"  health: {views.health_text(d.health, d.health_time, now)}")
    for k, v in sorted(d.attributes.items()):
        print(f"  {k} = {v}")
    for a in actions:
        print(f"  {views.deployment_text(a, versions)}")
        for e in histories.get(a.id, []):
            what = e.execution if e.channel == "deployment" else f"{e.channel} {e.execution}"
            detail = "; ".join(e.details)
            print(
                f"      {views.iso(e.time)} {what}"
                + (f" ({e.finished})" if e.finished not in (None, "none") else "")
                + (f": {detail}" if detail else "")
            )
    return 0


def cmd_gateway_token(args: argparse.Namespace) -> int:
    token = None if args.disable else _new_token(args.token)
    with _store(args, create=True) as store:
        store.write(lambda c, _now: set_meta(c, devices.GATEWAY_META, auth.hash_token(token) if token else None))
    if token is None:
        _note("gateway tokens are refused from now on")
    else:
        _note("the gateway token is set (any device may use it; the previous one no longer works)")
        print(token)
    return 0


# -- bundles --------------------------------------------------------------------------------------------------


def _upload(args: argparse.Namespace, store: Store, bundle: Path) -> Distribution:
    from pitstop.ota.server import artifacts  # noqa: PLC0415 - the bundle and X.509 code load only for uploads

    keyring = args.keyring or (store.keyring_path if store.keyring_path.exists() else None)
    try:
        total = bundle.stat().st_size
    except OSError as e:
        raise InputError(f"cannot read {bundle}: {e.strerror}") from None
    bar = Progress("upload", total, enabled=not args.quiet)
    up = artifacts.upload(store, bundle, keyring=keyring, on_bytes=bar.update)
    bar.finish()
    d = up.distribution
    check = (
        f"verified against {keyring}"
        if d.verified
        else "NOT verified (no keyring: pitstop server serve --keyring, or upload --keyring)"
    )
    if up.new:
        _note(
            f"bundle {d.id}: {d.label} (security version {d.security_version}), {human_size(d.size)}, {check}, "
            f"signed by {d.signer or 'nobody'}"
        )
    else:
        _note(f"bundle {d.id}: {d.label} was uploaded already")
    return d


def cmd_upload(args: argparse.Namespace) -> int:
    with _store(args, create=True) as store:
        d = _upload(args, store, args.bundle)
    if args.json:
        _print_json(views.bundle_json(d))
    else:
        print(d.id)
    return 0


def cmd_bundles(args: argparse.Namespace) -> int:
    with _store(args) as store:
        dists = store.read(deployments.list_distributions)
    if args.json:
        _print_json([views.bundle_json(d) for d in dists])
        return 0
    print(
        views.table(
            ["ID", "NAME", "VERSION", "SECURITY", "SIZE", "SIGNATURE", "SIGNER"], [views.bundle_row(d) for d in dists]
        )
    )
    return 0


# -- rollouts -------------------------------------------------------------------------------------------------


def _targets(args: argparse.Namespace, c: Any) -> tuple[list[str], str]:
    if args.device:
        for d in args.device:
            devices.require(c, devices.check_id(d))
        names = list(dict.fromkeys(args.device))
        return names, names[0] if len(names) == 1 else f"{len(names)} devices"
    if args.group is not None:
        ids = devices.ids(c, devices.check_id(args.group, "group"))
        if not ids:
            raise DeployError(f"group {args.group!r} has no device")
        return ids, f"group {args.group}"
    ids = devices.ids(c)
    if not ids:
        raise DeployError("no device is registered (pitstop server device add)")
    return ids, "all devices"


def cmd_deploy(args: argparse.Namespace) -> int:
    percents = waves.parse_waves(args.waves)
    max_failure = waves.parse_fraction(args.max_failure, "--max-failure")
    advance_at = waves.parse_fraction(args.advance_at, "--advance-at")
    if advance_at == 0:
        raise DeployError("--advance-at must be above 0")
    if args.percent is not None and not 0 < args.percent <= 100:
        raise DeployError(f"--percent {args.percent:g}: must lie in 0 < p <= 100")
    window = str(Window.parse(args.maintenance_window)) if args.maintenance_window else None
    download, update = (
        ("attempt", "attempt") if args.soft else ("forced", "skip") if args.download_only else ("forced", "forced")
    )
    with _store(args, create=True) as store:
        ref = Path(args.bundle)
        if ref.is_file():
            dist = _upload(args, store, ref)
        elif args.bundle.isdigit() or "/" not in args.bundle:
            dist = store.read(lambda c: deployments.find_distribution(c, args.bundle))
        else:
            raise InputError(f"cannot open {args.bundle}: no such file")

        def create(c: Any, now: float) -> deployments.Created:
            ids, target = _targets(args, c)
            if args.percent is not None:
                target += f", {args.percent:g}%"
            spec = deployments.RolloutSpec(
                target=target,
                devices=ids,
                percent=args.percent,
                waves=percents,
                first_wave=args.first_wave,
                max_failure=max_failure,
                advance_at=advance_at,
                download=download,
                update=update,
                window=window,
                reinstall=args.reinstall,
                strict=bool(args.device),
            )
            return deployments.create_rollout(c, now, dist, spec)

        made = store.write(create)
    r = made.rollout
    if args.json:
        _print_json(
            {
                "rollout": f"r{r.id}",
                "bundle": dist.id,
                "version": dist.version,
                "waves": made.waves,
                "status": r.status.value,
                "skipped": [{"device": d, "why": w} for d, w in made.skipped],
            }
        )
        return 0
    n = sum(len(w) for w in made.waves)
    sizes = ", ".join(str(len(w)) for w in made.waves)
    print(
        f"rollout r{r.id}: {dist.label} to {n} device{'s' if n != 1 else ''} ({r.target}) in "
        f"{len(made.waves)} wave{'s' if len(made.waves) != 1 else ''} ({sizes}); wave 1: "
        + ", ".join(made.waves[0][:10])
        + (", …" if len(made.waves[0]) > 10 else "")
    )
    for dev, why in made.skipped:
        _note(f"skipped {dev}: {why}")
    return 0


def _rollout_id(text: str) -> int:
    t = text.strip().lower().removeprefix("r")
    if not t.isdigit():
        raise UsageError(f"{text!r} is not a rollout (r3)")
    return int(t)


def cmd_rollouts(args: argparse.Namespace) -> int:
    with _store(args) as store, store.reading() as c:
        rs = (
            deployments.list_rollouts(c)
            if args.rollout is None
            else [deployments.get_rollout(c, _rollout_id(args.rollout))]
        )
        dists = {d.id: d for d in deployments.list_distributions(c)}
        totals = {r.id: deployments.rollout_totals(c, r.id) for r in rs}
        members = (
            {}
            if args.rollout is None
            else {
                r.id: c.execute(
                    "SELECT wave, device_id, status, id FROM actions WHERE rollout_id = ? ORDER BY wave, device_id",
                    (r.id,),
                ).fetchall()
                for r in rs
            }
        )
        now = store.now()
    if args.json:
        docs = [views.rollout_json(r, dists[r.distribution_id], totals[r.id]) for r in rs]
        for doc, r in zip(docs, rs, strict=True):
            if r.id in members:
                doc["devices"] = [
                    {"wave": w + 1, "device": d, "status": s, "action": a} for w, d, s, a in members[r.id]
                ]
        _print_json(docs if args.rollout is None else docs[0])
        return 0
    rows = []
    for r in rs:
        t = totals[r.id]
        rows.append(
            [
                f"r{r.id}",
                dists[r.distribution_id].label,
                r.target,
                views.rollout_state(r),
                "/".join(str(s) for s in r.wave_sizes),
                str(t["success"]),
                str(t["failure"]),
                str(t["running"] + t["canceling"]),
                str(t["scheduled"]),
                str(t["canceled"]),
                views.ago(r.created, now),
                r.reason or "",
            ]
        )
    print(
        views.table(
            [
                "ROLLOUT",
                "BUNDLE",
                "TARGET",
                "STATUS",
                "WAVES",
                "OK",
                "FAILED",
                "RUNNING",
                "WAITING",
                "CANCELED",
                "CREATED",
                "REASON",
            ],
            rows,
        )
    )
    for r in rs:
        for w, d, s, a in members.get(r.id, []):
            print(f"  wave {w + 1}  {d}  a{a} {s}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    t = args.target.strip().lower()
    with _store(args) as store:
        if t.startswith("r"):
            rollout_id = _rollout_id(t)
            n = store.write(lambda c, now: deployments.cancel_rollout(c, now, rollout_id, force=args.force))
            print(
                f"rollout r{rollout_id} canceled ({n} action{'s' if n != 1 else ''} "
                f"{'ended' if args.force else 'canceled or asked to cancel'})"
            )
            return 0
        t = t.removeprefix("a")
        if not t.isdigit():
            raise UsageError(f"{args.target!r}: expected a rollout (r3) or an action (17)")
        a = store.write(lambda c, now: deployments.cancel_action(c, now, int(t), force=args.force))
    print(
        f"action {a.id} ({a.device_id}): {a.status.value}"
        + (" (the device is asked to cancel it at its next poll)" if a.status.value == "canceling" else "")
    )
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    rollout_id = _rollout_id(args.rollout)
    with _store(args) as store:
        r = store.write(lambda c, now: deployments.resume_rollout(c, now, rollout_id))
    print(f"rollout r{r.id}: {views.rollout_state(r)}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from pitstop.ota.server import consistency  # noqa: PLC0415

    with _store(args) as store:
        found = consistency.problems(store, deep=args.deep)
    for p in found:
        print(p)
    if found:
        raise StoreError(f"{len(found)} problem{'s' if len(found) != 1 else ''} in {args.data} (listed above)")
    print(f"{args.data}: OK")
    return 0
