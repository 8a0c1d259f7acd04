"""``fedsynsam flower ...``: run fedsynsam on Flower's deployment runtime.

* ``demo``: start a local federation (a SuperLink and one SuperNode per client on 127.0.0.1),
  run a grid of (algorithm, compressor, seed) through it, tear it down, and print the same
  table as ``fedsynsam compare``.
* ``run``: run one configuration on an existing federation (``--superlink HOST:PORT``).
* ``app``: write the Flower app folder, for ``flwr run`` by hand.
* ``tls``: a CA and a SuperLink certificate for your own machines; ``node-key``: a SuperNode's
  key pair for SuperNode authentication.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
from pathlib import Path

from ..config import Config
from .settings import AppSettings, check_flower, write_app

__all__ = ["add_parser"]


def _app_settings(args, out: Path) -> AppSettings:
    return AppSettings(
        out=str(out.resolve()),
        round_timeout=args.round_timeout,
        connect_timeout=args.connect_timeout,
        resume=getattr(args, "resume", False),
    ).validate()


def _demo(args, resolve, csv_list, seed_list) -> int:
    from ..compare import run_grid
    from .deploy import LocalFederation

    base = resolve(args, skip=("algorithm", "compressor", "seed"))
    base.setdefault("clients", 4)
    clients = base["clients"]
    if isinstance(clients, bool) or not isinstance(clients, int) or not 1 <= clients <= 64:
        raise ValueError(f"clients (one SuperNode each) must be an integer in [1, 64] for the demo; got {clients!r}")
    base.setdefault("per_round", min(3, clients))
    out = Path(args.out)
    algorithms, compressors = csv_list(args.algorithms), csv_list(args.compressors)
    seeds = seed_list(args.seeds)
    for a in algorithms:  # refuse what Flower cannot run before starting anything
        for c in compressors:
            check_flower(Config.from_dict({**base, "algorithm": a, "compressor": c}).validate())
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="flower-", dir=out))
    env = {"OMP_NUM_THREADS": "1"} if args.single_thread else {}
    echo = None if args.quiet else (lambda line: print(line, flush=True) if "fedsynsam:" in line else None)
    fed = LocalFederation(clients, work, env=env, secure=args.secure)

    def runner(cfg: Config, run_dir: Path) -> None:
        if run_dir.exists():  # a run that did not finish: node state is per run, so start it over
            shutil.rmtree(run_dir)
        app_dir = work / f"app-{run_dir.name}"
        write_app(app_dir, cfg, _app_settings(args, run_dir))
        print(f"fedsynsam flower: {run_dir.name} on {clients} SuperNodes", flush=True)
        fed.run(app_dir, timeout=args.timeout, echo=echo)
        if not (run_dir / "summary.json").is_file():
            raise RuntimeError(f"the Flower run of {run_dir.name} ended without a summary; logs in {work}")

    with fed:
        print(f"fedsynsam flower: SuperLink on 127.0.0.1:{fed.port}, {clients} SuperNodes; logs in {work}")
        if args.secure:
            print(
                f"fedsynsam flower: TLS (CA {fed.tls.ca}) and SuperNode authentication "
                f"({clients} keys registered, in {work / 'keys'})"
            )
        run_grid(base, algorithms, compressors, seeds, out, progress=False, runner=runner)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _run(args, resolve) -> int:
    from .deploy import flwr_bin, flwr_run

    if ":" not in args.superlink:
        raise ValueError(f"--superlink must be HOST:PORT; got {args.superlink!r}")
    if args.insecure == bool(args.root_certificates):
        raise ValueError("pass exactly one of --root-certificates CA.pem (TLS) and --insecure (loopback only)")
    if args.insecure and not _is_loopback(args.superlink):
        raise ValueError(
            f"--insecure sends models and updates in clear text; it is allowed only on loopback, not "
            f"{args.superlink!r}: start the SuperLink with --ssl-* files and pass --root-certificates"
        )
    if args.root_certificates and not Path(args.root_certificates).is_file():
        raise FileNotFoundError(f"--root-certificates {args.root_certificates} does not exist")
    cfg = check_flower(Config.from_dict(resolve(args), source=args.config or "flags").validate())
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="fedsynsam-flower-") as tmp:
        write_app(Path(tmp) / "app", cfg, _app_settings(args, out))
        home = Path(tmp) / "flwr-home"
        home.mkdir()
        conn = f'[superlink]\ndefault = "target"\n\n[superlink.target]\naddress = "{args.superlink}"\n'
        conn += (
            "insecure = true\n"
            if args.insecure
            else f'root-certificates = "{Path(args.root_certificates).resolve()}"\n'
        )
        (home / "config.toml").write_text(conn)
        env = {**os.environ, "FLWR_HOME": str(home)}
        cmd = [flwr_bin("flwr"), "run", str(Path(tmp) / "app"), "target", "--stream"]
        flwr_run(cmd, env, Path(tmp) / "run.log", timeout=args.timeout, echo=print)
    print(f"fedsynsam flower run: finished; the outputs are in {out} on the SuperLink's machine")
    return 0


def _app(args, resolve) -> int:
    cfg = check_flower(Config.from_dict(resolve(args), source=args.config or "flags").validate())
    path = write_app(args.folder, cfg, _app_settings(args, Path(args.out)))
    print(f"wrote {path}; run it with: flwr run {args.folder} YOUR-SUPERLINK --stream [--run-config FILE.toml]")
    return 0


def _tls(args) -> int:
    from .secure import make_tls

    files = make_tls(args.folder, hosts=tuple(args.host), days=args.days)
    print(
        f"wrote {files.ca} (give it to every SuperNode and flwr: --root-certificates / root-certificates), "
        f"{files.cert} and {files.key} (the SuperLink's: --ssl-certfile, --ssl-keyfile; --ssl-ca-certfile {files.ca}); "
        f"valid for {', '.join(args.host)} for {args.days} days. The CA's own key is not kept: "
        "make a new set to add an address"
    )
    return 0


def _node_key(args) -> int:
    from .secure import make_node_key

    if Path(args.path).exists():
        raise FileExistsError(f"{args.path} exists; pick another path (a key is never overwritten)")
    key, pub = make_node_key(args.path)
    print(
        f"wrote {key} (stays on the SuperNode's machine: --auth-supernode-private-key {key}) and {pub} "
        f"(register it: flwr supernode register {pub} YOUR-SUPERLINK)"
    )
    return 0


def add_parser(sub, add_config_flags, resolve, csv_list, seed_list) -> None:
    """The ``flower`` subcommand of the fedsynsam CLI (the other arguments: its helpers)."""
    flower = sub.add_parser("flower", help="run on Flower's deployment runtime (SuperLink + SuperNodes)")
    fsub = flower.add_subparsers(dest="flower_command", required=True)

    def common(p, timeout=3600.0):
        p.add_argument("--config", help="TOML file of settings (flags override it)")
        p.add_argument("--round-timeout", type=float, default=120.0, help="seconds to wait for a round's replies")
        p.add_argument("--connect-timeout", type=float, default=120.0, help="seconds to wait for the SuperNodes")
        p.add_argument("--timeout", type=float, default=timeout, help="seconds a whole run may take")

    demo = fsub.add_parser("demo", help="local SuperLink + one SuperNode per client; a grid of runs, tabulated")
    demo.add_argument("--out", required=True, help="output folder (finished runs in it are skipped)")
    demo.add_argument("--algorithms", default="fedsynsam", help="comma-separated (default: fedsynsam)")
    demo.add_argument("--compressors", default="topk", help="comma-separated (default: topk)")
    demo.add_argument("--seeds", default="0", help="comma-separated integers (default: 0)")
    demo.add_argument("--single-thread", action="store_true", help="OMP_NUM_THREADS=1 in every Flower process")
    demo.add_argument("--quiet", action="store_true", help="no per-round log lines")
    demo.add_argument(
        "--secure",
        action="store_true",
        help="TLS with a CA made for the demo, and SuperNode authentication with each node's key registered",
    )
    common(demo)
    add_config_flags(demo, skip=("algorithm", "compressor", "seed"))
    demo.set_defaults(func=lambda a: _demo(a, resolve, csv_list, seed_list))

    run = fsub.add_parser("run", help="one run on an existing federation")
    run.add_argument("--superlink", required=True, help="the SuperLink's HOST:PORT")
    run.add_argument("--root-certificates", help="CA certificate (PEM) of the SuperLink's TLS certificate")
    run.add_argument("--insecure", action="store_true", help="no TLS (only for a SuperLink on loopback)")
    run.add_argument("--out", required=True, help="output folder on the SuperLink's machine")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (after its ServerApp or SuperLink died); "
        "nodes started with --node-config 'state-dir=\"DIR\"' continue from their saved residuals",
    )
    common(run)
    add_config_flags(run)
    run.set_defaults(func=lambda a: _run(a, resolve))

    app = fsub.add_parser("app", help="write the Flower app folder (pyproject.toml) for flwr run")
    app.add_argument("folder", help="folder to write")
    app.add_argument("--out", default="runs/flower", help="output folder on the SuperLink's machine")
    common(app)
    add_config_flags(app)
    app.set_defaults(func=lambda a: _app(a, resolve))

    tls = fsub.add_parser("tls", help="a CA and a SuperLink certificate (PEM) for TLS on your own machines")
    tls.add_argument("folder", help="folder to write ca.pem, server.pem and server.key into")
    tls.add_argument(
        "--host", action="append", required=True, help="an IP address or DNS name of the SuperLink (repeatable)"
    )
    tls.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")
    tls.set_defaults(func=_tls)

    key = fsub.add_parser("node-key", help="a SuperNode's key pair for --enable-supernode-auth")
    key.add_argument("path", help="private key file to write (the public key goes to PATH.pub)")
    key.set_defaults(func=_node_key)
