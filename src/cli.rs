//! The `vncbroker` command line.
//!
//! `serve` runs the broker; `user`, `vm` and `token` are local admin tools
//! that work directly on the database the config names.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::inventory::{Console, LocalInventory};
use crate::policy::{Clipboard, Control, VmPolicy};
use crate::protocol::Protocol;
use crate::service::{MintRequest, TokenService};
use crate::store::{self, Cause, Registry, Revocation, Revoked, Vm};

#[derive(Debug, Parser)]
#[command(
    name = "vncbroker",
    version,
    about = "Console-access broker: console tokens for VMs, and the proxy that redeems them"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Configuration file (TOML).
    #[arg(long, global = true, env = "VNCBROKER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Database URL, e.g. sqlite:///var/lib/vncbroker/vncbroker.db.
    #[arg(long, global = true, value_name = "URL")]
    pub database: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker: XML-RPC at /RPC2 and JSON at /api/v1.
    Serve {
        /// Address to listen on, e.g. 0.0.0.0:8640 (port 0 picks a free one).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// What this node serves.
        #[arg(long, value_enum)]
        role: Option<crate::config::Role>,
        /// This node's name in session records.
        #[arg(long, value_name = "NAME")]
        node_name: Option<String>,
    },
    /// Start everything on this machine: the broker, a demo VNC server as
    /// VM 0 and a demo user; prints a console URL.
    #[cfg_attr(
        not(feature = "demo"),
        command(about = "Not built in: this build has no demo (cargo feature `demo`)")
    )]
    Demo {
        /// Address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8640")]
        listen: String,
        /// Keep the demo database here instead of a temporary directory.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Manage local users.
    #[command(subcommand)]
    User(UserCmd),
    /// Manage the local VM registry.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Console tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Session recordings.
    #[command(subcommand)]
    Recording(RecordingCmd),
    /// List recorded console sessions, newest first; `sessions end ID`
    /// ends one.
    #[command(args_conflicts_with_subcommands = true)]
    Sessions {
        #[command(subcommand)]
        action: Option<SessionsCmd>,
        #[command(flatten)]
        list: SessionsList,
    },
}

#[derive(Debug, Args)]
pub struct SessionsList {
    /// Only sessions of this VM.
    #[arg(long, value_name = "ID")]
    vm: Option<i64>,
    /// Only sessions of this user.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// Only sessions started since: Unix seconds, or an age such as 90s, 30m, 12h, 7d.
    #[arg(long, value_name = "T", value_parser = parse_since)]
    since: Option<i64>,
    /// Only live sessions: who is on each VM now, in control or watching.
    #[arg(long)]
    live: bool,
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum SessionsCmd {
    /// End a live session, on whichever node runs it (within about 2 s).
    End { id: i64 },
}

/// Parses `--since`: Unix seconds, or an age before now.
fn parse_since(s: &str) -> Result<i64, String> {
    if let Ok(t) = s.parse::<i64>() {
        return Ok(t);
    }
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = num
        .parse()
        .map_err(|_| format!("{s:?} is neither Unix seconds nor an age like 30m"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("{s:?}: the age unit is s, m, h or d")),
    };
    Ok(crate::now_unix().saturating_sub(secs))
}

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Add a user; the password is read from standard input.
    Add {
        name: String,
        /// May mint tokens for any VM.
        #[arg(long)]
        admin: bool,
        /// Read the password from standard input (one line).
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// List users.
    List,
    /// Set a user's password, read from standard input. Live sessions go
    /// on; `--end-sessions` ends them and revokes the user's tokens.
    Passwd {
        name: String,
        /// Read the password from standard input (one line).
        #[arg(long, required = true)]
        password_stdin: bool,
        /// Also end the user's live sessions and revoke their tokens.
        #[arg(long)]
        end_sessions: bool,
    },
    /// Remove a user: their tokens are revoked and their live sessions end.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Register a VM and where its console (VNC or SPICE) listens.
    Add {
        id: i64,
        /// Console server host.
        #[arg(long)]
        host: String,
        /// Console server port.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        port: u16,
        /// What the console speaks: vnc (the default) or spice.
        #[arg(long, value_parser = parse_protocol, value_name = "vnc|spice")]
        protocol: Option<Protocol>,
        /// The owning user (must exist).
        #[arg(long)]
        owner: String,
        /// A display name (defaults to vm-ID).
        #[arg(long)]
        name: Option<String>,
        /// Read the console password (VNC or SPICE) from standard input (one
        /// line); the proxy answers the server with it and the client never
        /// sees it.
        #[arg(long)]
        password_stdin: bool,
        /// Other users who may open the console.
        #[arg(long, value_delimiter = ',', value_name = "USER,...")]
        allow: Vec<String>,
        /// Control sessions: shared (several at once), exclusive (one at a
        /// time; view-only sessions always join), or default.
        #[arg(long, value_parser = setting::<Control>, value_name = "shared|exclusive|default")]
        control: Option<Setting<Control>>,
        /// Which way clipboard text may go: both, to-vm, from-vm, none, or
        /// default (`[proxy] clipboard`).
        #[arg(long, value_parser = setting::<Clipboard>, value_name = "both|to-vm|from-vm|none|default")]
        clipboard: Option<Setting<Clipboard>>,
        /// Record its sessions: yes, no, or default (`[recording] default`).
        #[arg(long, value_parser = setting::<Flag>, value_name = "yes|no|default")]
        record: Option<Setting<Flag>>,
        /// SPICE: let clients plug USB devices into the VM (usbredir
        /// channels): yes, no, or default (no).
        #[arg(long, value_parser = setting::<Flag>, value_name = "yes|no|default")]
        usb_redirect: Option<Setting<Flag>>,
        /// SPICE: let clients send their microphone (the record channel):
        /// yes, no, or default (no).
        #[arg(long, value_parser = setting::<Flag>, value_name = "yes|no|default")]
        microphone: Option<Setting<Flag>>,
    },
    /// List VMs.
    List,
    /// Change a VM. A new host, port, protocol or password ends its live
    /// sessions and revokes its tokens; a new owner ends the old owner's
    /// (unless still allowed).
    Set {
        id: i64,
        #[arg(long)]
        host: Option<String>,
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        port: Option<u16>,
        /// What the console speaks: vnc or spice (unchanged if not given).
        #[arg(long, value_parser = parse_protocol, value_name = "vnc|spice")]
        protocol: Option<Protocol>,
        #[arg(long)]
        owner: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// Read a new console password from standard input (one line).
        #[arg(long, conflicts_with = "no_password")]
        password_stdin: bool,
        /// Remove the stored console password.
        #[arg(long)]
        no_password: bool,
        /// Control sessions: shared (several at once), exclusive (one at a
        /// time; view-only sessions always join), or default.
        #[arg(long, value_parser = setting::<Control>, value_name = "shared|exclusive|default")]
        control: Option<Setting<Control>>,
        /// Which way clipboard text may go: both, to-vm, from-vm, none, or
        /// default (`[proxy] clipboard`).
        #[arg(long, value_parser = setting::<Clipboard>, value_name = "both|to-vm|from-vm|none|default")]
        clipboard: Option<Setting<Clipboard>>,
        /// Record its sessions: yes, no, or default (`[recording] default`).
        #[arg(long, value_parser = setting::<Flag>, value_name = "yes|no|default")]
        record: Option<Setting<Flag>>,
        /// SPICE: let clients plug USB devices into the VM (usbredir
        /// channels): yes, no, or default (no).
        #[arg(long, value_parser = setting::<Flag>, value_name = "yes|no|default")]
        usb_redirect: Option<Setting<Flag>>,
        /// SPICE: let clients send their microphone (the record channel):
        /// yes, no, or default (no).
        #[arg(long, value_parser = setting::<Flag>, value_name = "yes|no|default")]
        microphone: Option<Setting<Flag>>,
    },
    /// Let more users open a VM's console.
    Allow {
        id: i64,
        #[arg(required = true, value_name = "USER")]
        users: Vec<String>,
    },
    /// Take users off a VM's allowed list: their live sessions on it end and
    /// their tokens for it are revoked.
    Disallow {
        id: i64,
        #[arg(required = true, value_name = "USER")]
        users: Vec<String>,
    },
    /// Remove a VM: its tokens are revoked and its live sessions end.
    Rm { id: i64 },
}

#[derive(Debug, Subcommand)]
pub enum RecordingCmd {
    /// Write session ID's recording, decompressed, to FILE (`-` for
    /// standard output), for offline tools; the format is in the README.
    Export { id: i64, file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Mint a console token as the local administrator; prints the API's
    /// JSON, or with `--vv` a remote-viewer file for a SPICE VM.
    Mint {
        vm_id: i64,
        /// Lifetime in seconds (default from the config).
        #[arg(long)]
        ttl: Option<i64>,
        /// The token opens one session only.
        #[arg(long)]
        single_use: bool,
        /// The session may watch but not act: the proxy forwards no input
        /// and no clipboard to the VM.
        #[arg(long)]
        view_only: bool,
        /// Write a remote-viewer (.vv) file instead of JSON (SPICE VMs
        /// only): the broker at `public_url` is its proxy, the token its
        /// credential, and it holds no password.
        #[arg(long)]
        vv: bool,
        /// Where `--vv` writes the file (`-`, the default, for standard
        /// output); an existing file is not overwritten.
        #[arg(long, short = 'o', value_name = "FILE", requires = "vv")]
        output: Option<PathBuf>,
    },
}

/// Reads `--protocol`.
fn parse_protocol(s: &str) -> Result<Protocol, String> {
    s.parse()
        .map_err(|e: crate::policy::BadValue| e.to_string())
}

/// A VM setting on the command line: a value, or `default` to take the
/// broker's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting<T>(Option<T>);

/// A yes/no setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag(bool);

impl std::str::FromStr for Flag {
    type Err = crate::policy::BadValue;
    fn from_str(s: &str) -> Result<Flag, Self::Err> {
        // clap names the flag in its own message, before this one.
        crate::policy::parse_flag("the value", s).map(Flag)
    }
}

fn setting<T>(s: &str) -> Result<Setting<T>, String>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    if s.trim().eq_ignore_ascii_case("default") {
        return Ok(Setting(None));
    }
    s.parse()
        .map(|v| Setting(Some(v)))
        .map_err(|e: T::Err| format!("{e}, or default"))
}

/// The policy flags of `vm add` and `vm set`; `None`: not given.
#[derive(Debug, Clone, Copy, Default)]
struct Settings {
    control: Option<Setting<Control>>,
    clipboard: Option<Setting<Clipboard>>,
    record: Option<Setting<Flag>>,
    usb_redirect: Option<Setting<Flag>>,
    microphone: Option<Setting<Flag>>,
}

/// Applies the policy flags given on the command line to `policy`.
fn apply_settings(policy: &mut VmPolicy, s: Settings) {
    if let Some(Setting(c)) = s.control {
        policy.control = c;
    }
    if let Some(Setting(c)) = s.clipboard {
        policy.clipboard = c;
    }
    let flag = |f: Option<Flag>| f.map(|f| f.0);
    if let Some(Setting(r)) = s.record {
        policy.record = flag(r);
    }
    if let Some(Setting(u)) = s.usb_redirect {
        policy.usb_redirect = flag(u);
    }
    if let Some(Setting(m)) = s.microphone {
        policy.microphone = flag(m);
    }
}

/// A device a VM allows, and what a VNC VM, which has none, makes of it.
fn warn_vnc_devices(vm: &Vm) {
    if vm.protocol == Protocol::Vnc
        && (vm.policy.usb_redirect == Some(true) || vm.policy.microphone == Some(true))
    {
        eprintln!(
            "note: vm {}: USB redirection and the microphone are SPICE channels; \
             a VNC console has neither",
            vm.id
        );
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vncbroker: {}", causes(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once: a message that
/// already quotes its cause (a store error quotes the database's) is not
/// followed by it again.
fn causes(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// The effective configuration: file, then environment, then flags.
pub fn load_config(global: &Global) -> anyhow::Result<Config> {
    let mut cfg = Config::load(global.config.as_deref())?;
    cfg.apply_env(|k| std::env::var(k).ok())?;
    if let Some(db) = &global.database {
        cfg.database = db.clone();
    }
    Ok(cfg)
}

/// `serve`'s flags, applied over the file and the environment.
fn apply_serve_flags(
    cfg: &mut Config,
    listen: &Option<String>,
    role: &Option<crate::config::Role>,
    node_name: &Option<String>,
) {
    if let Some(l) = listen {
        cfg.listen = l.clone();
    }
    if let Some(r) = role {
        cfg.role = *r;
    }
    if let Some(n) = node_name {
        cfg.node_name = Some(n.clone());
    }
}

/// What `vncbroker demo` says in a build without the `demo` feature.
#[cfg(not(feature = "demo"))]
const DEMO_NOT_BUILT: &str = "the demo is not built into this vncbroker (it was built without \
     the cargo feature `demo`); build with default features, e.g. `cargo build --release`, \
     or use scripts/demo";

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let mut cfg = load_config(&cli.global)?;
    if let Command::Serve {
        listen,
        role,
        node_name,
    } = &cli.command
    {
        apply_serve_flags(&mut cfg, listen, role, node_name);
    }
    cfg.validate()?;
    crate::logging::init(&cfg.log.level, &cfg.log.format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // SQLite calls and password checks run on the blocking pool; SQLite
        // serialises on one connection anyway, so a burst of sessions need
        // not start hundreds of threads (each with its stack and arena).
        .max_blocking_threads(32)
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve {
                listen,
                role,
                node_name,
            } => {
                // SIGHUP reads the configuration again the same way.
                let global = Global {
                    config: cli.global.config.clone(),
                    database: cli.global.database.clone(),
                };
                let reload = move || -> anyhow::Result<Config> {
                    let mut cfg = load_config(&global)?;
                    apply_serve_flags(&mut cfg, &listen, &role, &node_name);
                    cfg.validate()?;
                    Ok(cfg)
                };
                crate::server::serve(cfg, Box::new(reload)).await
            }
            #[cfg(feature = "demo")]
            Command::Demo { listen, data_dir } => {
                cfg.listen = listen;
                crate::demo::run(cfg, data_dir).await
            }
            #[cfg(not(feature = "demo"))]
            Command::Demo { .. } => Err(anyhow::anyhow!(DEMO_NOT_BUILT)),
            Command::User(cmd) => user(&cfg, cmd).await,
            Command::Vm(cmd) => vm(&cfg, cmd).await,
            Command::Token(cmd) => token(&cfg, cmd).await,
            Command::Recording(RecordingCmd::Export { id, file }) => {
                export_recording(&cfg, id, &file).await
            }
            Command::Sessions {
                action: Some(SessionsCmd::End { id }),
                ..
            } => end_session(&cfg, id).await,
            Command::Sessions { action: None, list } => {
                let filter = crate::store::SessionFilter {
                    vm_id: list.vm,
                    user: list.user,
                    since: list.since,
                    live: list.live,
                    limit: list.limit,
                };
                sessions(&cfg, filter, list.json).await
            }
        }
    })
}

/// Reads one line from standard input, without its line ending.
fn read_secret(what: &str) -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .with_context(|| format!("reading the {what} from standard input"))?;
    let secret = line.trim_end_matches(['\r', '\n']).to_owned();
    if secret.is_empty() {
        bail!("the {what} read from standard input is empty");
    }
    Ok(secret)
}

async fn user(cfg: &Config, cmd: UserCmd) -> anyhow::Result<()> {
    let store = store::open(&cfg.database).await?;
    match cmd {
        UserCmd::Add { name, admin, .. } => {
            check_name(&name)?;
            let password = read_secret("password")?;
            let hash = tokio::task::spawn_blocking(move || crate::auth::hash_password(&password))
                .await?
                .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?;
            store.add_user(&name, &hash, admin).await?;
            println!("user {name} added{}", if admin { " (admin)" } else { "" });
        }
        UserCmd::List => {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{:<24} ADMIN", "NAME")?;
            for u in store.users().await? {
                writeln!(out, "{:<24} {}", u.name, if u.admin { "yes" } else { "no" })?;
            }
        }
        UserCmd::Passwd {
            name, end_sessions, ..
        } => {
            let password = read_secret("password")?;
            let hash = tokio::task::spawn_blocking(move || crate::auth::hash_password(&password))
                .await?
                .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?;
            if !store.set_password(&name, &hash).await? {
                bail!("no user {name:?}");
            }
            print!("password of {name} changed");
            if end_sessions {
                let done = store
                    .revoke(&Revocation::user(&name, None, Cause::Revoked))
                    .await?;
                print!("; {}", effect(&done));
            }
            println!();
        }
        UserCmd::Rm { name } => match store.remove_user(&name).await? {
            Some(done) => println!("user {name} removed; {}", effect(&done)),
            None => bail!("no user {name:?}"),
        },
    }
    Ok(())
}

/// What a revocation did, for the admin's terminal.
fn effect(done: &Revoked) -> String {
    format!(
        "{} token{} revoked, {} live session{} ending",
        done.tokens,
        if done.tokens == 1 { "" } else { "s" },
        done.sessions,
        if done.sessions == 1 { "" } else { "s" }
    )
}

/// User names end up in session strings ("user:password"), so no colon.
fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 128
        || name.contains(':')
        || name.chars().any(char::is_control)
    {
        bail!("a user name is 1 to 128 characters, without ':' or control characters");
    }
    Ok(())
}

async fn vm(cfg: &Config, cmd: VmCmd) -> anyhow::Result<()> {
    let store = store::open(&cfg.database).await?;
    match cmd {
        VmCmd::Add {
            id,
            host,
            port,
            protocol,
            owner,
            name,
            password_stdin,
            allow,
            control,
            clipboard,
            record,
            usb_redirect,
            microphone,
        } => {
            if host.trim().is_empty() {
                bail!("--host must not be empty");
            }
            let protocol = protocol.unwrap_or_default();
            let vnc_password = if password_stdin {
                let plain = read_secret(&format!("{} password", protocol.as_str().to_uppercase()))?;
                let secrets = crate::server::open_secrets(cfg, &*store).await?;
                Some(secrets.seal(&plain)?)
            } else {
                None
            };
            let vm = Vm {
                id,
                name: name.unwrap_or_else(|| format!("vm-{id}")),
                vnc_host: host,
                vnc_port: port,
                vnc_password,
                owner,
                allowed: allow.into_iter().filter(|a| !a.is_empty()).collect(),
                policy: VmPolicy::default(),
                protocol,
            };
            let mut vm = vm;
            let settings = Settings {
                control,
                clipboard,
                record,
                usb_redirect,
                microphone,
            };
            apply_settings(&mut vm.policy, settings);
            warn_vnc_devices(&vm);
            store.add_vm(&vm).await?;
            println!("vm {id} added ({protocol})");
        }
        VmCmd::List => {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:<8} {:<20} {:<28} {:<16} {:<8} {:<10} {:<10} {:<8} {:<9} {:<8} {:<8} ALLOWED",
                "ID",
                "NAME",
                "CONSOLE",
                "OWNER",
                "PASSWORD",
                "CONTROL",
                "CLIPBOARD",
                "RECORD",
                "PROTOCOL",
                "USB",
                "MIC"
            )?;
            let or_default = |s: Option<&str>| s.unwrap_or("default").to_owned();
            let yes_no = |b: Option<bool>| or_default(b.map(|b| if b { "yes" } else { "no" }));
            for v in store.vms().await? {
                writeln!(
                    out,
                    "{:<8} {:<20} {:<28} {:<16} {:<8} {:<10} {:<10} {:<8} {:<9} {:<8} {:<8} {}",
                    v.id,
                    v.name,
                    format!("{}:{}", v.vnc_host, v.vnc_port),
                    v.owner,
                    if v.vnc_password.is_some() {
                        "yes"
                    } else {
                        "no"
                    },
                    or_default(v.policy.control.map(Control::as_str)),
                    or_default(v.policy.clipboard.map(Clipboard::as_str)),
                    yes_no(v.policy.record),
                    v.protocol.as_str(),
                    yes_no(v.policy.usb_redirect),
                    yes_no(v.policy.microphone),
                    v.allowed.join(",")
                )?;
            }
        }
        VmCmd::Set {
            id,
            host,
            port,
            protocol,
            owner,
            name,
            password_stdin,
            no_password,
            control,
            clipboard,
            record,
            usb_redirect,
            microphone,
        } => {
            let mut vm = store
                .vm(id)
                .await?
                .with_context(|| format!("no VM with id {id}"))?;
            if let Some(host) = host {
                if host.trim().is_empty() {
                    bail!("--host must not be empty");
                }
                vm.vnc_host = host;
            }
            if let Some(port) = port {
                vm.vnc_port = port;
            }
            if let Some(protocol) = protocol {
                vm.protocol = protocol;
            }
            if let Some(owner) = owner {
                vm.owner = owner;
            }
            if let Some(name) = name {
                vm.name = name;
            }
            if password_stdin {
                let plain =
                    read_secret(&format!("{} password", vm.protocol.as_str().to_uppercase()))?;
                let secrets = crate::server::open_secrets(cfg, &*store).await?;
                vm.vnc_password = Some(secrets.seal(&plain)?);
            } else if no_password {
                vm.vnc_password = None;
            }
            let settings = Settings {
                control,
                clipboard,
                record,
                usb_redirect,
                microphone,
            };
            apply_settings(&mut vm.policy, settings);
            warn_vnc_devices(&vm);
            update_vm(store.as_ref(), &vm).await?;
        }
        VmCmd::Allow { id, users } | VmCmd::Disallow { id, users } if users.is_empty() => {
            bail!("no users named for VM {id}");
        }
        VmCmd::Allow { id, users } => {
            let mut vm = store
                .vm(id)
                .await?
                .with_context(|| format!("no VM with id {id}"))?;
            for u in users {
                if !vm.allowed.contains(&u) {
                    vm.allowed.push(u);
                }
            }
            update_vm(store.as_ref(), &vm).await?;
        }
        VmCmd::Disallow { id, users } => {
            let mut vm = store
                .vm(id)
                .await?
                .with_context(|| format!("no VM with id {id}"))?;
            let unknown: Vec<&String> = users.iter().filter(|u| !vm.allowed.contains(u)).collect();
            if !unknown.is_empty() {
                bail!("not on VM {id}'s allowed list: {unknown:?}");
            }
            vm.allowed.retain(|a| !users.contains(a));
            update_vm(store.as_ref(), &vm).await?;
        }
        VmCmd::Rm { id } => match store.remove_vm(id).await? {
            Some(done) => println!("vm {id} removed; {}", effect(&done)),
            None => bail!("no VM with id {id}"),
        },
    }
    Ok(())
}

async fn update_vm(store: &dyn Registry, vm: &Vm) -> anyhow::Result<()> {
    match store.update_vm(vm).await? {
        Some(done) => println!("vm {} updated; {}", vm.id, effect(&done)),
        None => bail!("no VM with id {}", vm.id),
    }
    Ok(())
}

/// `sessions end ID`: ends a live session, as an admin would through the API.
async fn end_session(cfg: &Config, id: i64) -> anyhow::Result<()> {
    let store = store::open(&cfg.database).await?;
    let record = store
        .session(id)
        .await?
        .with_context(|| format!("no session with id {id}"))?;
    if record.ended_at.is_some() {
        bail!("session {id} has already ended");
    }
    store.revoke(&Revocation::session(&record)).await?;
    println!(
        "session {id} (VM {}, {}) ending on node {}",
        record.vm_id, record.user, record.node
    );
    Ok(())
}

/// `recording export ID FILE`, from this node's `[recording] dir`.
async fn export_recording(cfg: &Config, id: i64, file: &std::path::Path) -> anyhow::Result<()> {
    let dir = cfg
        .recording
        .dir
        .as_deref()
        .context("no [recording] dir is set in the configuration")?;
    let path = crate::recording::path_for(std::path::Path::new(dir), id);
    if !path.is_file() {
        bail!("no recording of session {id} in {dir} (recorded on another node, or purged?)");
    }
    let file = file.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        if file.as_os_str() == "-" {
            let mut out = std::io::stdout().lock();
            return Ok(crate::recording::decompress_to(&path, &mut out)?);
        }
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file)
            .with_context(|| format!("creating {}", file.display()))?;
        let n = crate::recording::decompress_to(&path, &mut out)?;
        out.sync_all()?;
        eprintln!("session {id}: {n} bytes written to {}", file.display());
        Ok(n)
    })
    .await??;
    Ok(())
}

async fn token(cfg: &Config, cmd: TokenCmd) -> anyhow::Result<()> {
    let TokenCmd::Mint {
        vm_id,
        ttl,
        single_use,
        view_only,
        vv,
        output,
    } = cmd;
    let store = store::open(&cfg.database).await?;
    let vm = store
        .vm(vm_id)
        .await?
        .with_context(|| format!("no VM with id {vm_id}"))?;
    let secrets = crate::server::open_secrets(cfg, &*store).await?;
    let console = Console {
        user: vm.owner.clone(),
        vm_id,
        host: vm.vnc_host,
        port: vm.vnc_port,
        vnc_password: secrets.open_opt(vm.vnc_password.as_deref())?,
        policy: vm.policy,
        protocol: vm.protocol,
        recheck_as: None,
    };
    let public_url = cfg
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", cfg.listen));
    let inventory = std::sync::Arc::new(LocalInventory::new(
        store.clone(),
        secrets.clone(),
        cfg.auth_cache_ttl(),
        cfg.api.auth_cache_size,
    ));
    let service = TokenService::new(
        store.clone(),
        store,
        inventory,
        secrets,
        cfg.policy(),
        &public_url,
    );
    service.set_defaults(cfg.session_defaults());
    let request = MintRequest {
        ttl,
        single_use: single_use.then_some(true),
        view_only,
    };
    if vv {
        crate::api::vv::proxy_origin(&public_url)?;
        let mint = service.mint_viewer_for_console(console, request).await?;
        let file = crate::api::vv::file(&mint, &public_url)?;
        return write_vv(output.as_deref(), &file);
    }
    let minted = service.mint_for_console(console, request).await?;
    println!("{}", serde_json::to_string_pretty(&minted)?);
    Ok(())
}

/// Writes a remote-viewer file to `output` (standard output if `None` or
/// `-`); a new file is readable by its owner only, since its token opens
/// the console.
fn write_vv(output: Option<&std::path::Path>, file: &str) -> anyhow::Result<()> {
    let Some(path) = output.filter(|p| p.as_os_str() != "-") else {
        std::io::stdout().lock().write_all(file.as_bytes())?;
        return Ok(());
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut out = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    out.write_all(file.as_bytes())
        .and_then(|()| out.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("remote-viewer file written to {}", path.display());
    Ok(())
}

async fn sessions(
    cfg: &Config,
    filter: crate::store::SessionFilter,
    json: bool,
) -> anyhow::Result<()> {
    let store = store::open(&cfg.database).await?;
    let list = store.sessions(&filter).await?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<8} {:<6} {:<12} {:<22} {:<18} {:<11} {:<9} {:<7} {:>12} {:>10} {:>6} {:>7} {:>9} {:>9} {:<10} {:<8} {:>8}  REASON",
        "ID",
        "VM",
        "USER",
        "CLIENT",
        "NODE",
        "STARTED",
        "DURATION",
        "MODE",
        "TO CLIENT",
        "TO SERVER",
        "KEYS",
        "POINTER",
        "CLIP>VM",
        "CLIP<VM",
        "RECORDING",
        "PROTOCOL",
        "CHANNELS"
    )?;
    let count = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    for s in list {
        let duration = match s.ended_at {
            Some(end) => format!("{}s", end - s.started_at),
            None => "live".into(),
        };
        writeln!(
            out,
            "{:<8} {:<6} {:<12} {:<22} {:<18} {:<11} {:<9} {:<7} {:>12} {:>10} {:>6} {:>7} {:>9} {:>9} {:<10} {:<8} {:>8}  {}",
            s.id,
            s.vm_id,
            s.user,
            s.client_addr,
            s.node,
            s.started_at,
            duration,
            if s.view_only { "view" } else { "control" },
            s.bytes_to_client,
            s.bytes_to_server,
            count(s.key_events),
            count(s.pointer_events),
            count(s.clipboard_bytes_to_vm),
            count(s.clipboard_bytes_from_vm),
            s.recording_state.map_or("-", |r| r.as_str()),
            s.protocol.as_str(),
            s.channels,
            s.close_reason.unwrap_or_default()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Built without the demo, `vncbroker demo` is still a command, and it
    /// says why it does nothing (`scripts/test` runs this build).
    #[cfg(not(feature = "demo"))]
    #[test]
    fn demo_without_the_feature_says_it_is_not_built_in() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Not built in"), "{help}");
        let cli = Cli::try_parse_from(["vncbroker", "demo", "--listen", "127.0.0.1:0"]).unwrap();
        let err = run(cli).unwrap_err().to_string();
        assert!(
            err.contains("the demo is not built into this vncbroker") && err.contains("`demo`"),
            "{err}"
        );
    }

    #[test]
    fn since_accepts_unix_seconds_and_ages() {
        assert_eq!(parse_since("1700000000"), Ok(1_700_000_000));
        let now = crate::now_unix();
        let t = parse_since("2h").unwrap();
        assert!((now - 7200 - t).abs() <= 1);
        assert!(parse_since("2w").is_err());
        assert!(parse_since("soon").is_err());
        assert!(parse_since("").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn vm_protocol_and_device_flags() {
        let cli = Cli::try_parse_from([
            "vncbroker",
            "vm",
            "add",
            "3",
            "--host",
            "h",
            "--port",
            "5903",
            "--owner",
            "alice",
            "--protocol",
            "SPICE",
            "--usb-redirect",
            "yes",
            "--microphone",
            "default",
        ])
        .unwrap();
        let Command::Vm(VmCmd::Add {
            protocol,
            usb_redirect,
            microphone,
            record,
            ..
        }) = cli.command
        else {
            panic!("not vm add");
        };
        assert_eq!(protocol, Some(Protocol::Spice));
        let mut policy = VmPolicy {
            microphone: Some(true),
            ..VmPolicy::default()
        };
        apply_settings(
            &mut policy,
            Settings {
                usb_redirect,
                microphone,
                record,
                ..Settings::default()
            },
        );
        assert_eq!(
            (policy.usb_redirect, policy.microphone, policy.record),
            (Some(true), None, None)
        );
        // `vm set` keeps the protocol unless told.
        let cli =
            Cli::try_parse_from(["vncbroker", "vm", "set", "3", "--microphone", "no"]).unwrap();
        let Command::Vm(VmCmd::Set {
            protocol,
            microphone,
            ..
        }) = cli.command
        else {
            panic!("not vm set");
        };
        assert_eq!(protocol, None);
        assert_eq!(microphone, Some(Setting(Some(Flag(false)))));
        let err = Cli::try_parse_from(["vncbroker", "vm", "set", "3", "--protocol", "rdp"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--protocol") && err.contains("vnc, spice"),
            "{err}"
        );
        let err = Cli::try_parse_from(["vncbroker", "vm", "set", "3", "--usb-redirect", "maybe"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--usb-redirect") && err.contains("yes, no") && err.contains("default"),
            "{err}"
        );
    }

    #[test]
    fn token_mint_vv_output_needs_vv() {
        assert!(Cli::try_parse_from(["vncbroker", "token", "mint", "3", "-o", "x.vv"]).is_err());
        let cli =
            Cli::try_parse_from(["vncbroker", "token", "mint", "3", "--vv", "-o", "x.vv"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Token(TokenCmd::Mint {
                vv: true,
                output: Some(_),
                ..
            })
        ));
    }

    #[test]
    fn user_names() {
        assert!(check_name("alice").is_ok());
        assert!(check_name("a:b").is_err());
        assert!(check_name("").is_err());
        assert!(check_name("a\nb").is_err());
    }
}
