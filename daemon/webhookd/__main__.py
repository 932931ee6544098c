"""Command line: run, check, init, migrate, events, send, status, retry, refresh, tenant,
portal, receiver."""

from __future__ import annotations

import signal
import sys

# `webhookd run` holds SIGHUP from here on. Its default action ends the process, and until
# the event loop's handler is in place (the imports below and start-up take some hundreds
# of milliseconds) a reload (`systemctl reload`, logrotate's `kill -HUP`) would kill the
# daemon. Held, the signal stays pending; cmd_run releases it once the daemon is ready, and
# it applies as a reload then. Threads started meanwhile (the store's writer) inherit the
# mask and keep it, so the signal goes to the main thread. Only the interpreter's own
# start-up comes before this line (the package's __init__ imports nothing).
HANGUP = {signal.SIGHUP}
if sys.argv[1:2] == ["run"]:
    signal.pthread_sigmask(signal.SIG_BLOCK, HANGUP)

import argparse
import asyncio
import gc
import json
import os
import resource
import secrets
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from webhookd import __version__, config, events, logs, views
from webhookd.terminal import json_text, visible, visible_lines

DEFAULT_CONFIG = "config.toml"
T = TypeVar("T")


def config_path(args: argparse.Namespace) -> str:
    return str(args.config or os.environ.get("WEBHOOKD_CONFIG") or DEFAULT_CONFIG)


def load_client_or_exit(args: argparse.Namespace) -> config.ClientConfig:
    """Where the daemon listens and its token: all a client command reads of the file."""
    return _or_exit(config.load_client, args)


def load_or_exit(args: argparse.Namespace) -> config.Config:
    return _or_exit(config.load, args)


def _or_exit(load: Callable[[str], T], args: argparse.Namespace) -> T:
    """`load` the config file; on errors, print them (one per line) and exit 1."""
    path = config_path(args)
    try:
        return load(path)
    except config.ConfigError as exc:
        for error in exc.errors:
            print(f"error: {visible(error)}", file=sys.stderr)
        if not Path(path).exists():
            print(f"hint: {visible(where_config_comes_from(args))}", file=sys.stderr)
        raise SystemExit(1) from None


def where_config_comes_from(args: argparse.Namespace) -> str:
    """For a config file that is not there: how its path was chosen, and the other ways."""
    if args.config:
        return "that is the path given with -c (a relative one is from the current folder)"
    if os.environ.get("WEBHOOKD_CONFIG"):
        return "that path comes from $WEBHOOKD_CONFIG; set it to the daemon's file, or pass -c"
    return (
        f"with neither -c CONFIG nor $WEBHOOKD_CONFIG, webhookd reads ./{DEFAULT_CONFIG}; pass "
        "-c CONFIG or set WEBHOOKD_CONFIG=CONFIG (in a checkout, the demo's daemon uses "
        "config.example.toml)"
    )


# -- run -----------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, HANGUP)  # as above, for main(["run", ...]) too
    import uvloop

    from webhookd.records import StoreError
    from webhookd.serve import Server, StartError, install_signals
    from webhookd.service import Service

    cfg = load_or_exit(args)
    logs.configure(cfg.daemon.log_format, cfg.daemon.log_level)
    import structlog

    log = structlog.get_logger("webhookd")
    from webhookd import checks

    # Those `check` prints too, but for DNS: names resolve at each connect, and a lookup
    # here could hold start-up for seconds.
    for warning in [*cfg.warnings, *checks.findings(cfg, resolve=False)]:
        log.warning("config_warning", warning=warning)

    # Per-webhook work allocates many short-lived objects and few cycles; the default
    # gen-0 threshold (700) made the collector a large share of delivery CPU (bench/).
    gc.set_threshold(50_000, 50, 100)
    open_files = raise_open_files_limit()
    if open_files < cfg.daemon.max_connections + OPEN_FILES_MARGIN:
        log.warning(
            "open_files_limit_low",
            limit=open_files,
            max_connections=cfg.daemon.max_connections,
            detail="raise the hard limit (LimitNOFILE= in the unit, ulimit -Hn) or lower "
            "max_connections; past the limit, connects and API clients fail",
        )

    async def main() -> None:
        shutdown, reload = asyncio.Event(), asyncio.Event()
        service = Service(cfg)
        install_signals(shutdown, reload, service)
        # A SIGHUP held since start-up is delivered when released, and applied as a reload.
        await Server(service).run(shutdown, reload, ready=release_hangups)

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    except (StartError, StoreError) as exc:
        # One line: what is wrong and what to do. Under systemd (Type=notify) the unit
        # fails at once: READY=1 was never sent.
        log.error("cannot_start", error=str(exc))
        return 1
    except OSError as exc:  # anything else the system refused while starting
        log.error("cannot_start", error=logs.one_line(exc))
        return 1
    return 0


def release_hangups() -> None:
    """Let SIGHUP through again, in the main thread: its handler is in place by now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANGUP)


# Descriptors besides outgoing connections: the database and its WAL, listeners, API
# clients, idle kept-alive connections, logs.
OPEN_FILES_MARGIN = 256


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one and return it. Every outgoing
    connection takes a descriptor, and the usual soft default (1024) barely covers the
    default max_connections (1000); the hard limit is what the operator meant to allow."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize
    wanted = max(soft, 1 << 20) if hard == resource.RLIM_INFINITY else hard
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            return soft  # e.g. above the kernel's nr_open: keep what we have
        return wanted
    return soft


# -- check and init ------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from webhookd import checks

    cfg = load_or_exit(args)
    warnings = [*cfg.warnings, *checks.findings(cfg)]
    d = cfg.daemon
    database, failed = f"{d.database} (durability {d.durability})", ""
    if isinstance(d.database, config.PostgresURL):
        # A database that cannot be used now is an error: the daemon could not use it either.
        probe = checks.probe_database(d.database)
        state = f"{probe.version}, reachable" if probe.version else "cannot be used: below"
        database = f"{d.database} ({state})"
        if probe.error:
            failed = f"{cfg.path}: daemon.database: {d.database}: {probe.error}"
    if failed:
        verdict = "the file is valid, but its database cannot be used (below)"
    elif warnings:
        verdict = f"OK, with {views.counted(len(warnings), 'warning')} (below)"
    else:
        verdict = "OK"
    print(f"{config_path(args)}: {verdict}")
    print(f"  database    {database}")
    print(f"  listen      {d.listen} ({'token required' if d.api_token else 'no token'})")
    if isinstance(d.database, config.PostgresURL):
        print("  tenants_dir - (on PostgreSQL, tenants made through the API are in the database)")
    else:
        print(f"  tenants_dir {d.tenants_dir or '-'}")
    print(f"  history     {history_summary(cfg)}")
    if cfg.catalogue.custom:
        print(f"  custom events: {', '.join(cfg.catalogue.custom)}")
    print(f"  {views.counted(len(cfg.tenants), 'tenant')}")
    rows = []
    for t in cfg.tenants.values():
        state = "batched" if t.batching else "single"
        secret = SECRET_SOURCES[t.secret_ref.kind]
        rows.append(
            [
                t.name,
                state if t.enabled else "disabled",
                "*" if "*" in t.events else len(t.subscribed),
                f"{secret}, signed" if t.signing_secret else secret,
                t.endpoint,
            ]
        )
    if rows:
        headers = ["TENANT", "STATE", "EVENTS", "SECRET", "ENDPOINT"]
        # The endpoint gives up room first, then the name (cut in the middle).
        shrink = [(4, 30), (0, 14), (4, 10), (0, 6)]
        print("\n" + views.table(headers, rows, shrink=shrink, middle=[0]))
    plain = checks.plain_http_unwarned(cfg)
    if plain:
        print(
            f"\n{views.counted(len(plain), 'endpoint')} without TLS: the secret travels "
            "unencrypted to " + ", ".join(plain)
        )
    if warnings:
        exits = "" if failed else " (the file is valid, so check exits 0; errors exit 1)"
        print(f"\n{views.counted(len(warnings), 'warning')}{exits}:")
        for warning in warnings:
            print(f"warning: {visible(warning)}")
    if failed:
        print(f"error: {visible(failed)}", file=sys.stderr)
        return 1
    return 0


def history_summary(cfg: config.Config) -> str:
    """What the history keeps, as `check` shows it: [delivery]'s retention and payloads, the
    tenants that differ, the size bound, the idempotency window and the largest replay."""
    options, d = cfg.delivery, cfg.daemon
    kept = (
        f"{views.span(options.history_retention)} "
        f"({'with' if options.history_payloads else 'without'} payloads)"
        if options.history_retention
        else "none kept"
    )
    differ = sum(
        (t.delivery.history_retention, t.delivery.history_payloads)
        != (options.history_retention, options.history_payloads)
        for t in cfg.tenants.values()
    )
    if differ:
        kept += f", {views.counted(differ, 'tenant')} otherwise"
    bound = (
        "no size limit"
        if d.history_max_bytes is None
        else f"at most {views.size(d.history_max_bytes)}"
    )
    return f"{kept}; {bound}; ids {views.span(d.idempotency_window)}; replays up to {d.replay_max}"


# -- migrate -------------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    from webhookd import migrate

    cfg = load_or_exit(args)
    source = cfg.daemon.database
    if isinstance(source, config.PostgresURL):
        raise CliError(
            f"{config_path(args)}: database in [daemon] is already PostgreSQL ({source}); "
            "migrate copies from the SQLite file it names"
        )
    target = target_url(args)
    logs.configure(cfg.daemon.log_format, "warning")  # the summary says what was done
    try:
        api_tenants = {
            name: config.tenant_toml(config.tenant_table(tenant, redact=False))
            for name, tenant in cfg.tenants.items()
            if tenant.from_api
        }
        copied = asyncio.run(migrate.run(source, target, api_tenants))
    except migrate.MigrateError as exc:
        raise CliError(str(exc)) from None
    print(f"copied {source} into {target}:")
    for count, what, plural in (
        (copied.tenants, "tenant", ""),
        (copied.queued, "queued webhook", ""),
        (copied.parked, "parked webhook", ""),
        (copied.ids, "producer id", ""),
        (copied.failures, "recent failure", ""),
        (copied.history, "history record", ""),
        (copied.failed_attempts, "failed attempt kept", "failed attempts kept"),
        (copied.replays, "replay", ""),
        (copied.api_tenants, "API tenant", ""),
    ):
        print(f"  {views.counted(count, what, plural)}")
    if copied.api_tenants:
        print(
            f"tenants made through the API now live in the database; {cfg.daemon.tenants_dir} "
            "is no longer read (its files are left as they were)"
        )
    print(
        f'next: set database = "{target}" in [daemon] of {config_path(args)} (the password '
        "in database_password_file or $WEBHOOKD_DATABASE_PASSWORD), then start the daemon; "
        f"{source} is left as it was"
    )
    return 0


def target_url(args: argparse.Namespace) -> config.PostgresURL:
    """--to as a PostgresURL, its password from the URL, --password-file or the variable."""
    try:
        url = config.postgres_url(args.to, Path.cwd())
    except ValueError as exc:
        raise CliError(f"--to: {exc}") from None
    passwords: dict[str, str] = {}
    if url.password.reveal():
        passwords["the URL"] = url.password.reveal()
    if args.password_file:
        try:
            text = Path(args.password_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"--password-file: cannot read {args.password_file}: {exc}") from None
        text = text.removesuffix("\n").removesuffix("\r")
        if not text or config.CONTROL_CHARACTERS.search(text):
            raise CliError(
                f"--password-file: {args.password_file} must hold the password on one line"
            )
        passwords["--password-file"] = text
    if os.environ.get(config.DATABASE_PASSWORD_ENV):
        passwords[f"${config.DATABASE_PASSWORD_ENV}"] = os.environ[config.DATABASE_PASSWORD_ENV]
    if len(passwords) > 1:
        raise CliError(
            f"the password is given in {len(passwords)} places ({', '.join(passwords)}); keep one"
        )
    password = next(iter(passwords.values()), "")
    return config.PostgresURL(url.url, config.Secret(password))


# How `check` names where a tenant's secret comes from.
SECRET_SOURCES = {"secret": "inline", "secret_file": "file", "secret_env": "env"}


# The starter file: the package's commented template (shipped with it, so an installed copy
# has it) with this file's values filled in; a `# comment` after a filled-in value is moved
# back to its column, or one space past a long value.
STARTER = "starter.toml"
COMMENT_COLUMN = 34


def starter_text(path: Path, state_dir: str) -> str:
    template = package_files("webhookd").joinpath(STARTER).read_text(encoding="utf-8")
    base = state_dir.rstrip("/") + "/" if state_dir else ""
    values = {
        "@PATH@": visible(str(path)),
        "@API_TOKEN@": secrets.token_urlsafe(32),
        "@DATABASE@": toml_string(f"{base}webhookd.db"),
        "@TENANTS_DIR@": toml_string(f"{base}tenants.d"),
    }
    lines = []
    for line in template.splitlines():
        markers = [marker for marker in values if marker in line]
        if not markers:
            lines.append(line)
            continue
        setting, commented, comment = line.partition(" # ")
        for marker in markers:
            setting = setting.replace(marker, values[marker])
        lines.append(f"{setting.ljust(COMMENT_COLUMN - 1)} # {comment}" if commented else setting)
    return "\n".join(lines) + "\n"


def toml_string(text: str) -> str:
    """`text` as a TOML string (escaped as TOML wants: quotes, backslashes, controls)."""
    return tomli_w.dumps({"v": text}).removeprefix("v = ").rstrip("\n")


def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.exists() and not args.force:
        print(f"error: {path} exists; use --force to overwrite", file=sys.stderr)
        return 1
    text = starter_text(path, args.state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # before the token is written: --force over a 0644 file
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    print(f"wrote {path} (mode 0600) with a fresh api_token")
    print(f"next: add tenants to it, then `webhookd check -c {path}`")
    return 0


# -- API clients ---------------------------------------------------------------------------------


class ApiError(Exception):
    """The daemon refused a call (`status` and its JSON `code`), or could not be reached
    (status 0). `detail` is the daemon's sentence, worded for any HTTP client."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class CliError(Exception):
    """An error worded for the command line (flags and files, not queries and headers)."""


def api_call(
    cfg: config.ClientConfig, method: str, path: str, body: Any = None, *, text: bool = False
) -> Any:
    host = cfg.listen_host
    if host in ("0.0.0.0", "::", ""):  # listening everywhere: talk to ourselves on loopback
        host = "127.0.0.1" if host != "::" else "::1"
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{cfg.listen_port}{path}"
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if text:
        request.add_header("Accept", "text/plain")
    token = cfg.api_token.reveal()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        try:
            error = json.loads(payload)
            code, detail = str(error.get("error")), str(error.get("detail"))
        except (ValueError, AttributeError):
            code, detail = "", f"HTTP {exc.code}: {payload.decode(errors='replace')}"
        raise ApiError(exc.code, code, detail) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiError(0, "unreachable", f"{host}:{cfg.listen_port}: {reason}") from None
    return payload.decode() if text else json.loads(payload)


def explain(exc: ApiError, args: argparse.Namespace) -> str:
    """What a refusal means for someone at the command line."""
    where = config_path(args)
    if exc.code == "unreachable":
        return f"cannot reach webhookd at {exc.detail} (listen in {where}); is the daemon running?"
    if exc.status == 401 and exc.code == "restart_needed":
        return (
            f"the daemon refused the API token in {where}: the token was changed after the "
            "daemon started, and the daemon keeps its old token until it is restarted "
            "(systemctl restart webhookd); a reload does not change it"
        )
    if exc.status == 401:
        return (
            f"the daemon refused the API token (api_token / api_token_file in {where}); "
            "is it the file the daemon runs with?"
        )
    return exc.detail


def tenant_arg(value: str) -> str:
    """A TENANT argument: checked here, since it becomes part of an API path."""
    if not config.TENANT_NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r}: tenant names are 1 to 64 of A-Z a-z 0-9 _ -")
    return value


def peek_limit(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a whole number from 1 to 1000")
    return int(value)


def cmd_send(args: argparse.Namespace) -> int:
    cfg = load_client_or_exit(args)
    raw = args.data
    if raw.startswith("@"):
        try:
            raw = Path(raw[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            print(
                f"error: --data {args.data}: {getattr(exc, 'strerror', None) or exc}",
                file=sys.stderr,
            )
            return 1
    try:
        json.loads(raw)
    except ValueError as exc:
        print(f"error: --data is not valid JSON: {exc}", file=sys.stderr)
        return 1
    # The data goes as typed, not re-encoded: the daemon delivers it as written (`1E2`
    # stays `1E2`), and so does this command.
    head = {"event": args.event, **({"id": args.id} if args.id else {})}
    body = json.dumps(head)[:-1] + ', "data": ' + raw.strip() + "}"
    answer = api_call(cfg, "POST", f"/v1/tenants/{args.tenant}/webhooks", body.encode())
    for webhook in answer["webhooks"]:
        print(f"{webhook['status']}: id {visible(webhook['id'])} sequence {webhook['sequence']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load_client_or_exit(args)
    path = f"/v1/tenants/{args.tenant}/status" if args.tenant else "/v1/status"
    # The daemon escapes its text views; escaped again here (a no-op then) so that what
    # reaches the terminal does not depend on the version of the daemon answering.
    print(visible_lines(api_call(cfg, "GET", path, text=True)), end="")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    cfg = load_client_or_exit(args)
    if args.all == bool(args.tenant):
        print("error: name a TENANT or give --all", file=sys.stderr)
        return 2
    if args.all:
        answer = api_call(cfg, "POST", "/v1/retry")
        retrying = views.counted(answer["count"], "tenant")
        print(f"retrying {retrying}: {', '.join(answer['retrying']) or '-'}")
    else:
        answer = api_call(cfg, "POST", f"/v1/tenants/{args.tenant}/retry")
        if answer["retrying"]:
            failed = views.counted(answer["attempts"], "failed attempt")
            state = f"retrying now ({answer['waiting']} waiting, {failed} so far)"
        else:
            state = f"nothing to retry ({answer['queue']})"
        print(f"{args.tenant}: {state}")
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    cfg = load_client_or_exit(args)
    answer = api_call(cfg, "POST", f"/v1/tenants/{args.tenant}/refresh")
    print(f"{args.tenant}: cleared {views.counted(answer['cleared'], 'failure')}")
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    """pause, resume, skip, parked, requeue, peek: the walk-through's API calls, by name."""
    cfg = load_client_or_exit(args)
    base = f"/v1/tenants/{args.tenant}"
    if args.command in ("pause", "resume"):
        api_call(cfg, "POST", f"{base}/{args.command}")
        print(f"{args.tenant}: {args.command}d")
    elif args.command == "skip":
        parked = api_call(cfg, "POST", f"{base}/skip")["parked"]
        print(f"{args.tenant}: parked id {visible(parked['id'])} sequence {parked['sequence']}")
    elif args.command == "requeue":
        webhook_id = urllib.parse.quote(args.id, safe="")
        answer = api_call(cfg, "POST", f"{base}/parked/{webhook_id}/requeue")
        shown = visible(answer["id"])
        print(f"{args.tenant}: requeued id {shown} as sequence {answer['sequence']}")
    elif args.command == "parked":
        print(json_text(api_call(cfg, "GET", f"{base}/parked")))
    else:  # peek
        print(json_text(api_call(cfg, "GET", f"{base}/webhooks?limit={args.limit}")))
    return 0


def cmd_portal(args: argparse.Namespace) -> int:
    """A signed link to the tenant's portal page (POST /v1/tenants/{tenant}/portal)."""
    cfg = load_client_or_exit(args)
    body = {"ttl": args.ttl} if args.ttl else {}
    answer = api_call(cfg, "POST", f"/v1/tenants/{args.tenant}/portal", body)
    print(answer["url"])
    edit = "may edit its Webhook config" if answer["can_edit"] else "read-only"
    print(f"expires {answer['expires_at']}; {edit}", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """A webhook by id: where it is now (queued, in flight, parked, delivered, ...)."""
    cfg = load_client_or_exit(args)
    path = f"/v1/tenants/{args.tenant}/webhooks/{urllib.parse.quote(args.id, safe='')}"
    if args.json:
        print(json_text(api_call(cfg, "GET", path)))
    else:
        print(visible_lines(api_call(cfg, "GET", path, text=True)), end="")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """A page of a tenant's history, with the filters given."""
    cfg = load_client_or_exit(args)
    params: dict[str, Any] = {"limit": args.limit}
    if args.oldest:
        params["order"] = "oldest"
    for key in ("cursor", "event", "from_sequence", "to_sequence", "since", "until", "outcome"):
        value = getattr(args, key)
        if value is not None:
            params[key] = value
    path = f"/v1/tenants/{args.tenant}/history?{urllib.parse.urlencode(params)}"
    if args.json:
        print(json_text(api_call(cfg, "GET", path)))
    else:
        print(visible_lines(api_call(cfg, "GET", path, text=True)), end="")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Queue a tenant's delivered webhooks again, by sequence or time range."""
    cfg = load_client_or_exit(args)
    if args.from_sequence is None and args.to_sequence is None and args.since is None:
        raise CliError("name what to replay: --from-sequence/--to-sequence, or --since")
    body: dict[str, Any] = {}
    for key in ("from_sequence", "to_sequence", "since", "until", "event", "replay_id"):
        value = getattr(args, key)
        if value is not None:
            body[key] = value
    if args.dry_run:
        body["dry_run"] = True
    answer = api_call(cfg, "POST", f"/v1/tenants/{args.tenant}/replay", body)
    count = views.counted(answer["count"], "webhook")
    if answer["dry_run"]:
        print(f"{args.tenant}: would replay {count} (dry run: nothing queued)")
    elif answer["count"]:
        again = " (already done: this replay_id's result)" if answer["repeated"] else ""
        print(
            f"{args.tenant}: replayed {count} as sequences "
            f"{answer['first_sequence']}-{answer['last_sequence']}{again}"
        )
    else:
        print(f"{args.tenant}: nothing to replay (no delivered webhook matches)")
    return 0


def sequence_arg(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: expected a sequence number")
    return int(value)


def _option_value(text: str) -> Any:
    """`key=value` from the command line: the value read as TOML, else as a plain string."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def cmd_tenant(args: argparse.Namespace) -> int:
    cfg = load_client_or_exit(args)
    if args.action == "show":
        path = f"/v1/tenants/{args.name}" if args.name else "/v1/tenants"
        print(json_text(api_call(cfg, "GET", path)))
        return 0
    if not args.name:
        print(f"error: tenant {args.action} needs a NAME", file=sys.stderr)
        return 2
    if args.action == "rm":
        return tenant_rm(cfg, args.name, discard=args.discard)
    # set: start from the current tenant (masked secrets are kept as they are), apply flags.
    try:
        current = api_call(cfg, "GET", f"/v1/tenants/{args.name}")
    except ApiError as exc:
        if exc.status != 404:
            raise
        current = {}
    table = {k: v for k, v in current.items() if k not in ("tenant", "source", "delivery")}
    if args.file:
        import tomllib

        table.update(tomllib.loads(Path(args.file).read_text(encoding="utf-8")))
    secrets_given = {
        "secret": args.secret,
        "secret_env": args.secret_env,
        "secret_file": args.secret_file,
    }
    if any(secrets_given.values()):
        for key in secrets_given:
            table.pop(key, None)
        table.update({k: v for k, v in secrets_given.items() if v})
    simple = {
        "endpoint": args.endpoint,
        "batching": args.batching,
        "enabled": args.enabled,
        "authorization_header": args.authorization_header,
        "signing_secret": args.signing_secret,
        "source_address": args.source_address,
    }
    table.update({k: v for k, v in simple.items() if v is not None})
    if args.events:
        table["events"] = [e.strip() for e in args.events.split(",") if e.strip()]
    for option in args.option:
        key, sep, value = option.partition("=")
        if not sep:
            print(f"error: --option {option!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        table[key.strip()] = _option_value(value.strip())
    answer = api_call(cfg, "PUT", f"/v1/tenants/{args.name}", table)
    print(json_text(answer))
    return 0


def tenant_rm(cfg: config.ClientConfig, name: str, *, discard: bool) -> int:
    query = "?discard=true" if discard else ""
    try:
        answer = api_call(cfg, "DELETE", f"/v1/tenants/{name}{query}")
    except ApiError as exc:
        if exc.code != "queue_not_empty":
            raise
        # The daemon's sentence names the HTTP query; the count is asked for separately.
        waiting = api_call(cfg, "GET", f"/v1/tenants/{name}/status")["waiting"]
        many = f"{waiting} webhooks are" if waiting != 1 else "1 webhook is"
        raise CliError(
            f"{many} waiting for {name}; let them deliver "
            f"(webhookd status {name}), or add --discard to drop them"
        ) from None
    print(f"removed {name} (discarded {views.counted(answer['discarded'], 'waiting webhook')})")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    """The event catalogue: built-in types, the config's custom ones, deprecated ones."""
    path = config_path(args)
    named = bool(args.config or os.environ.get("WEBHOOKD_CONFIG"))
    if named or Path(path).exists():
        catalogue = _or_exit(config.load_catalogue, args)
        custom = f"custom ([events] custom in {path})"
    else:  # no config file at all: what is built in is still worth showing
        catalogue = events.Catalogue()
        custom = f"custom (none: no {path})"
    print("current:")
    for name in events.CURRENT:
        print(f"  {name}")
    print(f"{custom}:")
    for name in catalogue.custom or ("-",):
        print(f"  {name}")
    print("deprecated (still delivered to tenants of the main file that list them):")
    for name, replacement in events.DEPRECATED.items():
        print(f"  {name}" + (f" (use {replacement})" if replacement else ""))
    return 0


def cmd_receiver(args: argparse.Namespace) -> int:
    from webhookd import receiver

    return receiver.main(args)


# -- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="webhookd", description="Durable, ordered, per-tenant webhook delivery."
    )
    parser.add_argument("--version", action="version", version=f"webhookd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, *, with_config: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if with_config:
            sub.add_argument(
                "-c",
                "--config",
                metavar="CONFIG",
                help="config file (default: $WEBHOOKD_CONFIG, else ./config.toml)",
            )
        return sub

    command("run", "run the daemon in the foreground").set_defaults(func=cmd_run)
    command("check", "validate the configuration and print a summary").set_defaults(func=cmd_check)
    init = command("init", "write a starter config with a fresh api_token", with_config=False)
    init.add_argument("path", nargs="?", default=DEFAULT_CONFIG, metavar="PATH")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.add_argument(
        "--state-dir",
        default="",
        metavar="DIR",
        help="put the database and tenants.d here (e.g. /var/lib/webhookd under systemd)",
    )
    init.set_defaults(func=cmd_init)

    command("events", "list the event types: built in, custom, deprecated").set_defaults(
        func=cmd_events
    )

    send = command("send", "ingest one webhook through the API")
    send.add_argument("tenant", metavar="TENANT", type=tenant_arg)
    send.add_argument("event", metavar="EVENT")
    send.add_argument("--data", default="{}", metavar="JSON|@FILE", help="the data object")
    send.add_argument("--id", help="the producer's id (makes a resend idempotent)")
    send.set_defaults(func=cmd_send)

    status = command("status", "show the status view as a table")
    status.add_argument("tenant", nargs="?", metavar="TENANT", type=tenant_arg)
    status.set_defaults(func=cmd_status)

    retry = command("retry", "attempt now, ignoring backoff")
    retry.add_argument("tenant", nargs="?", metavar="TENANT", type=tenant_arg)
    retry.add_argument("--all", action="store_true", help="every waiting tenant")
    retry.set_defaults(func=cmd_retry)

    refresh = command("refresh", "clear a tenant's recent failures")
    refresh.add_argument("tenant", metavar="TENANT", type=tenant_arg)
    refresh.set_defaults(func=cmd_refresh)

    for name, help_text in (
        ("pause", "hold a tenant's deliveries (events still queue)"),
        ("resume", "resume a paused tenant"),
        ("skip", "park the webhook at the head of a tenant's queue"),
        ("parked", "list a tenant's parked webhooks"),
        ("requeue", "put a parked webhook back at the tail (a new sequence)"),
        ("peek", "show the head of a tenant's queue"),
    ):
        control = command(name, help_text)
        control.add_argument("tenant", metavar="TENANT", type=tenant_arg)
        if name == "requeue":
            control.add_argument("id", metavar="ID", help="the parked webhook's id")
        if name == "peek":
            control.add_argument(
                "--limit", type=peek_limit, default=10, help="1 to 1000 (default 10)"
            )
        control.set_defaults(func=cmd_control)

    link = command("portal", "print a signed link to a tenant's portal page (expires)")
    link.add_argument("tenant", metavar="TENANT", type=tenant_arg)
    link.add_argument("--ttl", metavar="DURATION", help="how long it lasts (default 1h: 30m, 2h)")
    link.set_defaults(func=cmd_portal)

    show = command("show", "where a webhook is now, by its id (queued, delivered, ...)")
    show.add_argument("tenant", metavar="TENANT", type=tenant_arg)
    show.add_argument("id", metavar="ID", help="the webhook's id (the producer's or generated)")
    show.add_argument("--json", action="store_true", help="the API's JSON answer")
    show.set_defaults(func=cmd_show)

    hist = command("history", "list a tenant's delivered (and parked, discarded) webhooks")
    hist.add_argument("tenant", metavar="TENANT", type=tenant_arg)
    hist.add_argument("--limit", type=peek_limit, default=100, help="1 to 1000 (default 100)")
    hist.add_argument("--oldest", action="store_true", help="oldest first (default newest)")
    hist.add_argument("--cursor", type=sequence_arg, help="the next page (as the last printed)")
    hist.add_argument("--event", help="only this event type")
    hist.add_argument("--from-sequence", type=sequence_arg, metavar="N")
    hist.add_argument("--to-sequence", type=sequence_arg, metavar="N")
    hist.add_argument("--since", metavar="TIME", help="accepted at or after (RFC 3339 or unix)")
    hist.add_argument("--until", metavar="TIME", help="accepted before (RFC 3339 or unix)")
    hist.add_argument("--outcome", help="delivered, parked, requeued, discarded (comma-separated)")
    hist.add_argument("--json", action="store_true", help="the API's JSON answer")
    hist.set_defaults(func=cmd_history)

    rep = command("replay", "queue delivered webhooks again (new sequences, same ids)")
    rep.add_argument("tenant", metavar="TENANT", type=tenant_arg)
    rep.add_argument("--from-sequence", type=sequence_arg, metavar="N")
    rep.add_argument("--to-sequence", type=sequence_arg, metavar="N")
    rep.add_argument("--since", metavar="TIME", help="accepted at or after (RFC 3339 or unix)")
    rep.add_argument("--until", metavar="TIME", help="accepted before (RFC 3339 or unix)")
    rep.add_argument("--event", help="only this event type")
    rep.add_argument("--dry-run", action="store_true", help="only count what would be replayed")
    rep.add_argument("--replay-id", metavar="X", help="makes a retried replay safe (idempotent)")
    rep.set_defaults(func=cmd_replay)

    tenant_cmd = command("tenant", "show, create, change or remove API-managed tenants")
    tenant_cmd.add_argument("action", choices=["show", "set", "rm"])
    tenant_cmd.add_argument("name", nargs="?", metavar="NAME", type=tenant_arg)
    tenant_cmd.add_argument("--endpoint", help="the URL webhooks are sent to")
    tenant_cmd.add_argument("--events", help='comma-separated event types, or "*"')
    tenant_cmd.add_argument("--secret", help="the shared secret (stored in the tenant file)")
    tenant_cmd.add_argument("--secret-env", help="read the secret from this variable")
    tenant_cmd.add_argument("--secret-file", help="read the secret from this file")
    tenant_cmd.add_argument("--signing-secret", help="whsec_... for Standard Webhooks signing")
    tenant_cmd.add_argument("--source-address", help="local IP to send this tenant's webhooks from")
    for flag, key in (("batching", "batching"), ("enabled", "enabled")):
        group = tenant_cmd.add_mutually_exclusive_group()
        group.add_argument(f"--{flag}", dest=key, action="store_true", default=None)
        off = "--disabled" if flag == "enabled" else f"--no-{flag}"
        group.add_argument(off, dest=key, action="store_false")
    tenant_cmd.add_argument(
        "--no-authorization-header",
        dest="authorization_header",
        action="store_false",
        default=None,
        help="omit Authorization (for endpoints that reject it); the body secret still goes",
    )
    tenant_cmd.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [delivery] override, e.g. batch_window=2.0 (repeatable)",
    )
    tenant_cmd.add_argument("--file", help="a TOML file holding the tenant table")
    tenant_cmd.add_argument(
        "--discard", action="store_true", help="rm: drop webhooks still waiting"
    )
    tenant_cmd.set_defaults(func=cmd_tenant)

    migrate_cmd = command("migrate", "copy the SQLite database into an empty PostgreSQL one")
    migrate_cmd.add_argument(
        "--to", required=True, metavar="URL", help="postgresql://USER@HOST:PORT/DBNAME"
    )
    migrate_cmd.add_argument(
        "--password-file",
        metavar="FILE",
        help="the target's password (or the URL, or the variable WEBHOOKD_DATABASE_PASSWORD)",
    )
    migrate_cmd.set_defaults(func=cmd_migrate)

    recv = command("receiver", "a development endpoint that prints deliveries", with_config=False)
    recv.add_argument("--listen", default="127.0.0.1:9000", metavar="HOST:PORT")
    recv.add_argument("--secret", default="", help="expected shared secret")
    recv.add_argument("--signing-secret", default="", help="whsec_... to verify signatures")
    recv.add_argument("--fail-rate", type=float, default=0.0, help="answer 503 this often (0-1)")
    recv.add_argument("--delay", type=float, default=0.0, help="seconds to wait before answering")
    recv.add_argument("--quiet", action="store_true", help="print a summary line per second")
    recv.set_defaults(func=cmd_receiver)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ApiError as exc:
        print(f"error: {visible(explain(exc, args))}", file=sys.stderr)  # may quote the daemon
        return 1
    except CliError as exc:
        print(f"error: {visible(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`webhookd status | head`): stop quietly, as other tools do.
        # Python would otherwise report the failed flush of stdout again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return result


if __name__ == "__main__":
    sys.exit(main())
