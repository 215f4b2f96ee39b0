"""``edgepack agent``: set up, run and inspect the device agent on this machine.

``init`` writes ``agent.toml`` from the credentials ``edgepack device enroll --out`` wrote;
``run`` replaces itself with the lean daemon process (``python -m edge_agent``), which keeps
none of the CLI's libraries in memory; ``status`` reads the agent's state folder and needs no
network.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from edge_agent.setup import check_credentials_private, hand_over_state, load_setup
from edge_agent.status import agent_status
from edge_agent.teardown import purge as purge_state
from manifests.desired import RuntimeKind
from manifests.device import AgentConfig, parse_credentials, render_agent_config
from manifests.errors import ConfigError
from packager.app import app, console
from packager.display import safe_text, state_text
from packager.files import atomic_output
from packager.sdk.enrolment import device_id_from, join_token
from packager.sdk.enrolment import join as join_hub
from packager.systemd_unit import DEFAULT_UNIT_NAME, DEFAULT_USER, DEFAULT_WATCHDOG_S, UnitSpec, render_unit

agent_app = typer.Typer(help="Set up, run and inspect the device agent.", no_args_is_help=True)
app.add_typer(agent_app, name="agent")

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="agent.toml")]


@agent_app.command("init")
def init_cmd(
    credentials: Annotated[
        Path, typer.Option("--credentials", help="the file 'edgepack device enroll --out' wrote")
    ],
    runtime: Annotated[
        list[RuntimeKind] | None, typer.Option("--runtime", help="docker or process; repeatable")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="where the agent keeps its cache and state")
    ] = None,
    service_host: Annotated[
        str, typer.Option("--service-host", help="address module endpoints listen on")
    ] = "0.0.0.0",
    telemetry_interval: Annotated[float, typer.Option("--telemetry-interval", min=1, max=3600)] = 10.0,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
    out: Annotated[Path, typer.Option("--out", "-o", help="the agent.toml to write")] = Path("agent.toml"),
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
) -> None:
    """Write agent.toml for the device whose credentials are given."""
    try:
        data = credentials.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{credentials}: not found; write it with 'edgepack device enroll ID --out FILE'"
        ) from None
    creds = parse_credentials(data, source=str(credentials))
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it")
    base = out.resolve().parent
    try:
        config = AgentConfig.model_validate(
            {
                "credentials": credentials.resolve(),
                "state_dir": (state_dir or base / f"{creds.device_id}-state").resolve(),
                "runtimes": runtime or [RuntimeKind.PROCESS],
                "service_host": service_host,
                "telemetry_interval_s": telemetry_interval,
                "log_level": log_level,
            }
        )
    except ValueError as exc:
        raise ConfigError(f"agent settings: {str(exc).splitlines()[-1].strip()}") from None
    with atomic_output(out, mode=0o644) as fh:
        fh.write(render_agent_config(config).encode())
    console.print(
        f"wrote {out} for [bold]{creds.device_id}[/] (runtimes: {', '.join(config.runtimes)}, "
        f"state in {config.state_dir})\nstart it with: edgepack agent run --config {out}",
        highlight=False,
    )


def _load(config_path: Path) -> tuple[AgentConfig, str]:
    config, credentials = load_setup(config_path)
    return config, credentials.device_id


@agent_app.command("run")
def run_cmd(
    config: ConfigOption = Path("agent.toml"),
    stop_modules: Annotated[
        bool,
        typer.Option("--stop-modules", help="stop the modules too (default: they keep serving)"),
    ] = False,
    allow_open_credentials: Annotated[
        bool,
        typer.Option(
            "--allow-open-credentials",
            help="use credentials other users may read, with a warning (default: refuse them)",
        ),
    ] = False,
) -> None:
    """Run the agent until SIGTERM or Ctrl-C (structured logs on stderr)."""
    # A bad file, or credentials others may read, is reported here as one line before the
    # daemon starts (the daemon checks again, and logs the warning when allowed).
    agent_config, _ = _load(config)
    check_credentials_private(agent_config.credentials, allow_open=allow_open_credentials)
    argv = [sys.executable, "-m", "edge_agent", "--config", str(config)]
    if stop_modules:
        argv.append("--stop-modules")
    if allow_open_credentials:
        argv.append("--allow-open-credentials")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


@agent_app.command("status")
def status_cmd(
    config: ConfigOption = Path("agent.toml"),
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """What the agent last recorded: generation, each module's state, version, port, restarts."""
    agent_config, device_id = _load(config)
    status = agent_status(agent_config, device_id)
    if as_json:
        sys.stdout.write(json.dumps(status, indent=2, sort_keys=True) + "\n")
        return
    running = f"running (pid {status['agent_pid']})" if status["agent_pid"] else "not running"
    console.print(
        Text.assemble(
            safe_text(device_id, "bold"),
            f"  agent {running}  applied generation {status['applied_generation']}",
        )
    )
    if status["last_error"]:
        console.print(Text.assemble(("last error:", "red"), " ", safe_text(status["last_error"])))
    table = Table("service", "state", "version", "serving", "runtime", "port", "restarts", "reason")
    for s in status["services"]:
        table.add_row(
            safe_text(s["service"]),
            state_text(s["state"]),
            safe_text(s["version"] or "-"),
            safe_text(s["serving_version"] or "-"),
            safe_text(s["runtime"] or "-"),
            safe_text(s["port"] or "-"),
            safe_text(s["restarts"]),
            safe_text(s["reason"] or ""),
        )
    console.print(table)
    d = status["downloads"]
    console.print(f"downloaded: {d['manifests']} manifest(s), {d['blobs']} blob(s), {d['bytes']} byte(s)")


UnitDirOption = Annotated[
    Path, typer.Option("--unit-dir", help="where systemd reads units (a folder of your own to only write it)")
]
UnitNameOption = Annotated[str, typer.Option("--name", help="the unit's name, without .service")]


def _systemd_runs() -> bool:
    """Whether systemd is this machine's service manager (what sd_booted() checks)."""
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise ConfigError(f"{' '.join(argv)} failed: {detail[-1] if detail else f'exit {done.returncode}'}")


def _system_user(name: str, *, create: bool) -> tuple[int, int]:
    """The uid and gid of ``name``, made a system user (no login, no home) when missing."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if not create:
            raise ConfigError(f"user {name!r} does not exist; drop --no-create-user to make it") from None
        if shutil.which("useradd") is None:
            raise ConfigError(f"user {name!r} is missing and there is no useradd: create it") from None
        _run("useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", name)  # fmt: skip
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


@agent_app.command("install-service")
def install_service_cmd(
    config: ConfigOption = Path("agent.toml"),
    user: Annotated[str, typer.Option("--user", help="the system user the agent runs as")] = DEFAULT_USER,
    unit_dir: UnitDirOption = Path("/etc/systemd/system"),
    name: UnitNameOption = DEFAULT_UNIT_NAME,
    watchdog: Annotated[
        int,
        typer.Option(
            "--watchdog", min=10, max=3600, help="seconds the agent's loop may stand still before a restart"
        ),
    ] = DEFAULT_WATCHDOG_S,
    start: Annotated[bool, typer.Option("--start/--no-start", help="enable and start it now")] = True,
    create_user: Annotated[bool, typer.Option("--create-user/--no-create-user")] = True,
) -> None:
    """Run the agent under systemd: a hardened unit, its own user, started at boot."""
    agent_config, device_id = _load(config)
    if user == "root":
        raise ConfigError("the agent does not run as root; name a system user with --user")
    if os.geteuid() != 0:
        raise ConfigError("installing a service needs root: run it with sudo")
    uid, gid = _system_user(user, create=create_user)
    # The agent's own files belong to its user; nothing else on the device needs them.
    agent_config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    hand_over_state(agent_config.state_dir, uid, gid)
    os.chown(agent_config.credentials, uid, gid)
    agent_config.credentials.chmod(0o600)
    docker = RuntimeKind.DOCKER in agent_config.runtimes
    if docker:
        try:
            grp.getgrnam("docker")
        except KeyError:
            raise ConfigError(
                "the docker runtime is enabled but there is no docker group; install docker.io first"
            ) from None
    spec = UnitSpec(
        python=Path(sys.executable),
        config=config.resolve(),
        state_dir=agent_config.state_dir,
        device_id=device_id,
        user=user,
        docker=docker,
        watchdog_s=watchdog,
    )
    unit = unit_dir / f"{name}.service"
    with atomic_output(unit, mode=0o644) as fh:
        fh.write(render_unit(spec).encode())
    console.print(f"wrote {unit} (runs as {user}, state in {agent_config.state_dir})", highlight=False)
    if not start:
        console.print(f"start it: systemctl daemon-reload && systemctl enable --now {name}", highlight=False)
        return
    if not _systemd_runs():
        raise ConfigError(
            f"systemd does not run on this machine; {unit} is written, start the agent with "
            f"'edgepack agent run --config {config}' instead"
        )
    _run("systemctl", "daemon-reload")
    _run("systemctl", "enable", "--now", f"{name}.service")
    console.print(f"started {name}; follow it with: journalctl -u {name} -f", highlight=False)


@agent_app.command("uninstall-service")
def uninstall_service_cmd(
    unit_dir: UnitDirOption = Path("/etc/systemd/system"),
    name: UnitNameOption = DEFAULT_UNIT_NAME,
    purge: Annotated[
        bool, typer.Option("--purge", help="also stop its modules, delete its state folder (with --config)")
    ] = False,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="agent.toml (for --purge)")] = None,
) -> None:
    """Stop the agent's unit and remove it; with --purge its modules and state go too."""
    if purge and config is None:
        raise ConfigError("--purge needs --config: the agent.toml names the state folder to delete")
    loaded = _load(config) if purge and config is not None else None
    unit = unit_dir / f"{name}.service"
    if not unit.exists() and not purge:
        raise ConfigError(f"{unit}: no such unit; give --unit-dir/--name of the one install-service wrote")
    if _systemd_runs() and unit.exists():
        _run("systemctl", "disable", "--now", f"{name}.service")
    unit.unlink(missing_ok=True)
    if _systemd_runs():
        _run("systemctl", "daemon-reload")
    console.print(f"removed {unit}", highlight=False)
    if loaded is not None:
        agent_config, device_id = loaded
        stopped = purge_state(agent_config, device_id)
        console.print(
            f"stopped {len(stopped)} module instance(s) and deleted {agent_config.state_dir}", highlight=False
        )


@agent_app.command("join")
def join_cmd(
    url: Annotated[str, typer.Argument(help="the hub's URL, e.g. https://hub.example:8800")],
    state: Annotated[
        Path, typer.Option("--state", help="this device's folder: its key, credentials, agent.toml, state")
    ],
    id_from: Annotated[
        str, typer.Option("--id-from", help="the device id: hostname, machine-id, or the id itself")
    ] = "hostname",
    ca: Annotated[Path | None, typer.Option("--ca", help="the hub's CA certificate (an HTTPS hub)")] = None,
    runtime: Annotated[
        list[RuntimeKind] | None, typer.Option("--runtime", help="docker or process; repeatable")
    ] = None,
    wait: Annotated[
        float, typer.Option("--wait", min=0, max=86400, help="seconds to wait for an admin's approval")
    ] = 600,
    token_file: Annotated[
        str | None,
        typer.Option("--token-file", help="a file holding the provisioning token (- reads stdin)"),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option("--token", help="the provisioning token (ps shows it: prefer --token-file)"),
    ] = None,
) -> None:
    """Enrol this device by itself: make its own key, send the hub only a signed request, and
    write its credentials and agent.toml into --state (the key never leaves the device). The
    token comes from --token-file, --token or EDGEPACK_JOIN_TOKEN."""
    token = join_token(token=token, token_file=token_file, environ=os.environ, stdin=sys.stdin.buffer)
    device_id = device_id_from(id_from)
    joined = join_hub(url, token, device_id=device_id, folder=state, ca=ca, runtimes=runtime, wait_s=wait)
    tags = ", ".join(f"{k}={v}" for k, v in sorted(joined.tags.items())) or "no tags"
    console.print(
        safe_text(
            f"joined {joined.credentials.hub_url} as {device_id} ({tags})\n"
            f"start it with: edgepack agent run --config {joined.config}"
        ),
        highlight=False,
    )


@agent_app.command("verify-bundle")
def verify_bundle_cmd(
    folder: Annotated[Path, typer.Argument(help="the folder install.sh downloaded the bundle into")],
    credentials: Annotated[
        Path, typer.Option("--credentials", help="the device's credentials: its publisher keys are trusted")
    ],
    arch: Annotated[
        str | None, typer.Option("--arch", help="amd64 or arm64 (default: this machine's)")
    ] = None,
) -> None:
    """Check an agent bundle's signature and its wheels for this machine (install.sh runs it)."""
    from packager.agent_bundle import check_agent_bundle, machine_arch

    try:
        data = credentials.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{credentials}: cannot read it ({exc.strerror})") from None
    creds = parse_credentials(data, source=str(credentials))
    bundle = check_agent_bundle(folder, creds.publishers, arch or machine_arch())
    console.print(
        f"agent bundle {bundle.version} ({folder}): signed by a trusted publisher, every wheel checked",
        soft_wrap=True,
    )
