//! `ftctl`, the operator's control CLI, as a library so that it can be tested without a process.
//!
//! It owns argument parsing, finding the control socket, one request/answer exchange (or an event
//! stream) over it, and rendering answers as tables or JSON lines with ripgrep-style exit codes
//! (0 success, 1 a valid negative answer, 2 error). It never changes anything itself: every
//! effect is watchd's, asked for through [`crate::api::Request`].

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr};

use crate::api::{
    CONTROL_SOCKET, EventRecord, Request, Response, ServiceStatus, StatusReport, TransparentStatus,
};
use crate::config::{Config, ConfigError, DEFAULT_DATA_DIR};
use crate::machine::{EventKind, View};
use crate::node::report::{ClusterEvent, ClusterStatus, DbReport};

mod group;

/// The environment variable that names the control socket (below `--socket`, above `--config`).
pub const SOCKET_ENV: &str = "FTCTL_SOCKET";
/// How long ftctl waits to connect and for each answer line, unless `--timeout` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Room beyond watchd's own bound for its answer to a checkpoint or rollback to arrive.
const CHECKPOINT_ANSWER_MARGIN_SECS: u64 = 10;
/// How long `checkpoint` and `rollback` wait for their answer unless `--timeout` says
/// otherwise: a transparent dump of a large process may take far longer than
/// `DEFAULT_TIMEOUT`, and watchd bounds it itself (answering, once that bound passes, that the
/// work goes on), so ftctl waits for that answer instead of reporting a running dump as failed.
pub const CHECKPOINT_ANSWER_TIMEOUT: Duration = Duration::from_secs(
    crate::control::TRANSPARENT_TIMEOUT.as_secs() + CHECKPOINT_ANSWER_MARGIN_SECS,
);
/// The longest answer line ftctl accepts; a `logs` answer is the largest legitimate one.
pub const MAX_RESPONSE_LINE: u64 = 64 * 1024 * 1024;
/// Pause between connection attempts while watchd's accept backlog is full.
const CONNECT_RETRY: Duration = Duration::from_millis(10);

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: watchd gave a valid negative answer (e.g. no such service).
pub const EXIT_NEGATIVE: i32 = 1;
/// Exit code: anything went wrong.
pub const EXIT_ERROR: i32 = 2;

/// Control a local watchd.
#[derive(Debug, Parser)]
#[command(name = "ftctl", version, about = "Control the local ftkit watchd")]
struct Cli {
    /// The control socket (overrides FTCTL_SOCKET and --config).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// watchd's configuration file; its data_dir holds the control socket.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// How long to wait to connect and for each answer (not while following events). Default
    /// 5s; `checkpoint` and `rollback` wait for their answer as long as watchd works on them
    /// (130s) unless this is given.
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_timeout)]
    timeout: Option<Duration>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show every service's state and the listener's counters.
    Status {
        /// One JSON object per service per line.
        #[arg(long)]
        json: bool,
    },
    /// Start a stopped or failed service.
    Start {
        /// Service name.
        service: String,
    },
    /// Stop a service.
    Stop {
        /// Service name.
        service: String,
    },
    /// Restart a service (not counted against its restart budget).
    Restart {
        /// Service name.
        service: String,
    },
    /// Show recent supervision events.
    Events {
        /// Keep streaming new events until watchd hangs up or you interrupt.
        #[arg(long, short)]
        follow: bool,
        /// One JSON object per event per line.
        #[arg(long)]
        json: bool,
        /// Only the last N kept events.
        #[arg(long, value_name = "N")]
        last: Option<usize>,
    },
    /// Show the tail of a service's captured stdout/stderr.
    Logs {
        /// Service name.
        service: String,
        /// At most this many bytes from the end.
        #[arg(long, value_name = "N")]
        bytes: Option<u64>,
    },
    /// Make watchd re-read its configuration file.
    Reload,
    /// Checkpoint a service: one with transparent checkpoints is dumped now (prints the image
    /// ID, pages and pause); one that uses libft is asked to checkpoint its critical memory at
    /// its next safe point.
    Checkpoint {
        /// Service name.
        service: String,
        /// Checkpoint stream (`t_checkpoint(id)`; libft services only).
        #[arg(long, default_value_t = 0)]
        stream: u32,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Promote the warm standby instance of a service (started with FT_ROLE=standby) in
    /// place: it serves as primary from then on, without a restart.
    Promote {
        /// Service name.
        service: String,
        /// The ownership epoch handed to the application (default 0: an operator's promotion
        /// outside any group).
        #[arg(long, value_name = "N")]
        epoch: Option<u64>,
    },
    /// Roll a service with transparent checkpoints back, in place, to checkpoint ID (the
    /// newest good one when omitted).
    Rollback {
        /// Service name.
        service: String,
        /// The checkpoint's image ID (as `ftctl checkpoint` prints it).
        id: Option<u64>,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// File replication.
    Repl {
        #[command(subcommand)]
        command: ReplCommand,
    },
    /// Cluster membership and quorum, as this node sees them.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Change a cluster node's membership.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Resource groups: define, show, move, want online or offline.
    Group {
        #[command(subcommand)]
        command: group::GroupCommand,
    },
    /// The resources of every group.
    Resource {
        #[command(subcommand)]
        command: group::ResourceCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// This node, the view (epoch, members), quorum and votes, the disk owner, every node.
    Status {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Every configured node: state (joining, online, paused, offline) and links.
    Nodes {
        /// One JSON object per node per line.
        #[arg(long)]
        json: bool,
    },
    /// This node's copy of the cluster database.
    Db {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Set a cluster property (a global update: every member applies it).
    Set {
        /// The property.
        key: String,
        /// Its value.
        value: String,
    },
    /// Delete a cluster property.
    Unset {
        /// The property.
        key: String,
    },
    /// Any change of the cluster database, as JSON (e.g. `{"op":"add_node","node":"d"}`).
    Update {
        /// The update.
        json: String,
    },
    /// Recent membership and quorum events.
    Events {
        /// One JSON object per event per line.
        #[arg(long)]
        json: bool,
        /// Only the last N kept events.
        #[arg(long, value_name = "N")]
        last: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Pause a member: it stays in the cluster but may own no groups.
    Pause {
        /// The node.
        node: String,
    },
    /// Resume a paused member.
    Resume {
        /// The node.
        node: String,
    },
    /// Make this node leave the cluster on purpose (no regroup; run it against NODE's watchd).
    Leave {
        /// The node (this node).
        node: String,
    },
}

#[derive(Debug, Subcommand)]
enum ReplCommand {
    /// Per fileset and backup: connected or not, acknowledged sequence, lag.
    Status {
        /// One JSON object per fileset per line.
        #[arg(long)]
        json: bool,
    },
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be longer than 0s".into());
    }
    Ok(d)
}

/// What went wrong; each becomes `ftctl: <message>` on stderr and exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// No socket could be connected to.
    #[error("cannot reach watchd at {}: {reason} (is watchd running?)", path.display())]
    Unreachable {
        /// The socket tried.
        path: PathBuf,
        /// The OS error, as text.
        reason: String,
    },
    /// Talking over an established connection failed.
    #[error("lost the connection to watchd at {}: {source}", path.display())]
    Connection {
        /// The socket.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// watchd did not answer in time.
    #[error("watchd at {} did not answer within {}", path.display(), humantime::format_duration(*after))]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// The limit.
        after: Duration,
    },
    /// watchd closed the connection before it answered.
    #[error("watchd at {} hung up without an answer", path.display())]
    NoAnswer {
        /// The socket.
        path: PathBuf,
    },
    /// The answer could not be understood.
    #[error("malformed answer from watchd: {0}")]
    Malformed(String),
    /// The answer did not fit the question.
    #[error("unexpected answer from watchd: {0}")]
    Unexpected(String),
    /// watchd said the request failed.
    #[error("watchd: {0}")]
    Remote(String),
    /// An argument is not what the command takes.
    #[error("{0}")]
    Usage(String),
    /// `--config` could not be used.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// Writing our own output failed (other than a closed pipe).
    #[error("cannot write output: {0}")]
    Output(io::Error),
    /// The reader of our stdout went away (e.g. `| head`): not an error, ends quietly.
    #[error("output closed")]
    OutputClosed,
}

/// What a successful exchange amounted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Success,
    Negative,
}

/// Runs ftctl with `args` (the first being the program name) and returns its exit code.
pub fn run(
    args: impl IntoIterator<Item = OsString>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> i32 {
    run_with_env(args, std::env::var_os(SOCKET_ENV), stdout, stderr)
}

/// [`run`] with the value of `FTCTL_SOCKET` passed in, so tests need not touch the process's
/// environment.
fn run_with_env(
    args: impl IntoIterator<Item = OsString>,
    env_socket: Option<OsString>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with 0; usage errors to stderr with 2.
            let target: &mut dyn Write = if e.use_stderr() { stderr } else { stdout };
            let _ = write!(target, "{}", e.render());
            let _ = target.flush();
            return e.exit_code();
        }
    };
    let result = resolve_socket(cli.socket.as_deref(), env_socket, cli.config.as_deref())
        .and_then(|socket| execute(&cli, &socket, stdout, stderr));
    let code = match result {
        Ok(Outcome::Success) | Err(CtlError::OutputClosed) => EXIT_OK,
        Ok(Outcome::Negative) => EXIT_NEGATIVE,
        Err(e) => {
            let _ = writeln!(stderr, "ftctl: {e}");
            EXIT_ERROR
        }
    };
    let _ = stdout.flush();
    let _ = stderr.flush();
    code
}

/// The control socket: `--socket`, else `FTCTL_SOCKET`, else `<data_dir>/control.sock` of
/// `--config`, else the default data directory's.
fn resolve_socket(
    socket: Option<&Path>,
    env_socket: Option<OsString>,
    config: Option<&Path>,
) -> Result<PathBuf, CtlError> {
    if let Some(path) = socket {
        return Ok(path.to_owned());
    }
    if let Some(path) = env_socket.filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    if let Some(file) = config {
        return Ok(Config::load(file)?.watchd.data_dir.join(CONTROL_SOCKET));
    }
    Ok(Path::new(DEFAULT_DATA_DIR).join(CONTROL_SOCKET))
}

fn execute(
    cli: &Cli,
    socket: &Path,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, CtlError> {
    let request = match &cli.command {
        Command::Status { .. } => Request::Status,
        Command::Start { service } => Request::Start {
            service: service.clone(),
        },
        Command::Stop { service } => Request::Stop {
            service: service.clone(),
        },
        Command::Restart { service } => Request::Restart {
            service: service.clone(),
        },
        Command::Events { follow, last, .. } => Request::Events {
            follow: *follow,
            last: *last,
        },
        Command::Logs { service, bytes } => Request::Logs {
            service: service.clone(),
            max_bytes: *bytes,
        },
        Command::Reload => Request::Reload,
        Command::Checkpoint {
            service, stream, ..
        } => Request::Checkpoint {
            service: service.clone(),
            stream: Some(*stream),
        },
        Command::Promote { service, epoch } => Request::Promote {
            service: service.clone(),
            epoch: *epoch,
        },
        Command::Rollback { service, id, .. } => Request::Rollback {
            service: service.clone(),
            seq: *id,
        },
        Command::Repl { .. } => Request::ReplStatus,
        Command::Cluster {
            command: ClusterCommand::Status { .. } | ClusterCommand::Nodes { .. },
        } => Request::ClusterStatus,
        Command::Cluster {
            command: ClusterCommand::Events { last, .. },
        } => Request::ClusterEvents { last: *last },
        Command::Cluster {
            command: ClusterCommand::Db { .. },
        } => Request::ClusterDb,
        Command::Cluster {
            command: ClusterCommand::Set { key, value },
        } => Request::ClusterUpdate {
            update: cluster::gum::Update::SetProperty {
                key: key.clone(),
                value: value.clone(),
            },
        },
        Command::Cluster {
            command: ClusterCommand::Unset { key },
        } => Request::ClusterUpdate {
            update: cluster::gum::Update::DeleteProperty { key: key.clone() },
        },
        Command::Cluster {
            command: ClusterCommand::Update { json },
        } => Request::ClusterUpdate {
            update: serde_json::from_str(json)
                .map_err(|e| CtlError::Usage(format!("not a cluster database update: {e}")))?,
        },
        Command::Node { command } => match command {
            NodeCommand::Pause { node } => Request::NodePause {
                node: node.clone(),
                paused: true,
            },
            NodeCommand::Resume { node } => Request::NodePause {
                node: node.clone(),
                paused: false,
            },
            NodeCommand::Leave { node } => Request::NodeLeave { node: node.clone() },
        },
        Command::Group { command } => group::group_request(command)?,
        Command::Resource { command } => group::resource_request(command),
    };
    let mut conn = Connection::open(socket, cli.timeout.unwrap_or(DEFAULT_TIMEOUT))?;
    if cli.timeout.is_none()
        && matches!(
            cli.command,
            Command::Checkpoint { .. } | Command::Rollback { .. }
        )
    {
        conn.timeout = CHECKPOINT_ANSWER_TIMEOUT;
        conn.deadline_per_line = Some(CHECKPOINT_ANSWER_TIMEOUT);
    }
    conn.send(&request)?;
    match &cli.command {
        Command::Status { json } => match conn.answer()? {
            Response::Status(report) => {
                if *json {
                    print_status_json(&report, out)?;
                } else {
                    print_status_table(&report, out)?;
                }
                Ok(Outcome::Success)
            }
            other => negative_or_fail(other, err),
        },
        Command::Checkpoint { json, .. } | Command::Rollback { json, .. } => {
            match conn.answer()? {
                Response::Checkpointed(c) if *json => {
                    json_line(&c, out)?;
                    Ok(Outcome::Success)
                }
                Response::Checkpointed(c) => {
                    let kind = match c.parent {
                        Some(p) => format!("increment on #{p}"),
                        None => "full".to_owned(),
                    };
                    writeln!(
                        out,
                        "{}: checkpoint #{} of pid {} ({kind}): {} pages, {}, paused {}",
                        sanitize(&c.service),
                        c.seq,
                        c.pid,
                        c.pages,
                        format_bytes(c.image_bytes),
                        format_micros(c.pause_us)
                    )
                    .map_err(output_error)?;
                    for u in &c.unrestorable {
                        writeln!(out, "  not restorable by itself: {}", sanitize(u))
                            .map_err(output_error)?;
                    }
                    Ok(Outcome::Success)
                }
                Response::RolledBack(r) if *json => {
                    json_line(&r, out)?;
                    Ok(Outcome::Success)
                }
                Response::RolledBack(r) => {
                    writeln!(
                        out,
                        "{}: pid {} rolled back to checkpoint #{}, paused {}",
                        sanitize(&r.service),
                        r.pid,
                        r.seq,
                        format_micros(r.pause_us)
                    )
                    .map_err(output_error)?;
                    Ok(Outcome::Success)
                }
                Response::Ok { message } if *json => {
                    json_line(&serde_json::json!({ "message": message }), out)?;
                    Ok(Outcome::Success)
                }
                Response::Ok { message } => {
                    writeln!(out, "{}", sanitize(&message)).map_err(output_error)?;
                    Ok(Outcome::Success)
                }
                other => negative_or_fail(other, err),
            }
        }
        Command::Start { .. }
        | Command::Stop { .. }
        | Command::Restart { .. }
        | Command::Promote { .. }
        | Command::Reload
        | Command::Node { .. } => match conn.answer()? {
            Response::Ok { message } => {
                writeln!(out, "{}", sanitize(&message)).map_err(output_error)?;
                Ok(Outcome::Success)
            }
            other => negative_or_fail(other, err),
        },
        Command::Logs { .. } => match conn.answer()? {
            Response::Logs { text } => {
                out.write_all(text.as_bytes()).map_err(output_error)?;
                if !text.is_empty() && !text.ends_with('\n') {
                    out.write_all(b"\n").map_err(output_error)?;
                }
                Ok(Outcome::Success)
            }
            other => negative_or_fail(other, err),
        },
        Command::Events { follow, json, .. } => stream_events(&mut conn, *follow, *json, out, err),
        Command::Repl {
            command: ReplCommand::Status { json },
        } => match conn.answer()? {
            Response::Repl { filesets } => {
                print_repl(&filesets, *json, out)?;
                Ok(Outcome::Success)
            }
            other => negative_or_fail(other, err),
        },
        Command::Cluster { command } => match (command, conn.answer()?) {
            (ClusterCommand::Status { json }, Response::Cluster(status)) => {
                print_cluster_status(&status, *json, out)?;
                Ok(Outcome::Success)
            }
            (ClusterCommand::Nodes { json }, Response::Cluster(status)) => {
                print_cluster_nodes(&status, *json, out)?;
                Ok(Outcome::Success)
            }
            (ClusterCommand::Events { json, .. }, Response::ClusterEvents { events }) => {
                print_cluster_events(&events, *json, out)?;
                Ok(Outcome::Success)
            }
            (ClusterCommand::Db { json }, Response::ClusterDb(db)) => {
                print_cluster_db(&db, *json, out)?;
                Ok(Outcome::Success)
            }
            (
                ClusterCommand::Set { .. }
                | ClusterCommand::Unset { .. }
                | ClusterCommand::Update { .. },
                Response::Ok { message },
            ) => {
                writeln!(out, "{}", sanitize(&message)).map_err(output_error)?;
                Ok(Outcome::Success)
            }
            (_, other) => negative_or_fail(other, err),
        },
        Command::Group { command } => group::group_answer(command, conn.answer()?, out, err),
        Command::Resource { command } => group::resource_answer(command, conn.answer()?, out, err),
    }
}

fn json_line(value: &impl serde::Serialize, out: &mut dyn Write) -> Result<(), CtlError> {
    let line = serde_json::to_string(value).map_err(|e| CtlError::Unexpected(e.to_string()))?;
    writeln!(out, "{line}").map_err(output_error)
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// `ftctl cluster status`: a summary, then the nodes' table.
fn print_cluster_status(
    s: &ClusterStatus,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    if json {
        return json_line(s, out);
    }
    let q = &s.quorum;
    let mut rows = vec![
        vec!["cluster".to_owned(), s.cluster.clone()],
        vec![
            "node".to_owned(),
            format!(
                "{} (incarnation {}{}{})",
                s.node,
                s.incarnation,
                if s.realtime { ", real-time" } else { "" },
                if s.running {
                    ""
                } else {
                    ", membership not running"
                }
            ),
        ],
        vec![
            "view".to_owned(),
            if s.epoch == 0 {
                "none yet".to_owned()
            } else {
                format!("epoch {}: {}", s.epoch, s.members.join(" "))
            },
        ],
        vec![
            "quorum".to_owned(),
            format!(
                "{} ({} of {} votes, {} needed; {})",
                yes_no(q.has_quorum),
                q.votes,
                q.total,
                q.needed,
                q.kind
            ),
        ],
    ];
    if let Some(disk) = &q.disk {
        rows.push(vec![
            "disk".to_owned(),
            format!(
                "{disk} (owner: {})",
                q.disk_owner.as_deref().unwrap_or("none")
            ),
        ]);
    }
    rows.push(vec![
        "acting".to_owned(),
        if s.left {
            "no (left the cluster)".to_owned()
        } else {
            yes_no(s.acting).to_owned()
        },
    ]);
    rows.push(vec!["coordinator".to_owned(), s.coordinator.clone()]);
    rows.push(vec![
        "database".to_owned(),
        format!(
            "update {} (leader: {})",
            s.db_seq,
            s.db_leader.as_deref().unwrap_or("none")
        ),
    ]);
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| r.iter().map(|c| sanitize(c)).collect())
        .collect();
    let mut text = render_table(&rows);
    text.push('\n');
    text.push_str(&nodes_table(s));
    out.write_all(text.as_bytes()).map_err(output_error)
}

fn nodes_table(s: &ClusterStatus) -> String {
    let mut rows = vec![
        ["NODE", "STATE", "MEMBER-SINCE", "LINKS"]
            .map(String::from)
            .to_vec(),
    ];
    for n in &s.nodes {
        let links = if n.me {
            "(this node)".to_owned()
        } else if n.links.is_empty() {
            "-".to_owned()
        } else {
            n.links
                .iter()
                .map(|l| {
                    format!(
                        "{} {}{}",
                        l.network,
                        if l.connected { "up" } else { "down" },
                        l.heard_ms_ago
                            .map(|ms| format!(" (heard {} ago)", format_millis(ms)))
                            .unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let state = serde_json::to_value(n.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("{:?}", n.state));
        rows.push(
            [
                n.name.clone(),
                state,
                n.member_since
                    .map_or_else(|| "-".to_owned(), |e| format!("epoch {e}")),
                links,
            ]
            .iter()
            .map(|c| sanitize(c))
            .collect(),
        );
    }
    render_table(&rows)
}

/// `ftctl cluster nodes`.
fn print_cluster_nodes(s: &ClusterStatus, json: bool, out: &mut dyn Write) -> Result<(), CtlError> {
    if json {
        for n in &s.nodes {
            json_line(n, out)?;
        }
        return Ok(());
    }
    out.write_all(nodes_table(s).as_bytes())
        .map_err(output_error)
}

/// `ftctl cluster db`: the properties, then nodes, groups and resources.
fn print_cluster_db(db: &DbReport, json: bool, out: &mut dyn Write) -> Result<(), CtlError> {
    if json {
        return json_line(db, out);
    }
    let c = &db.content;
    let mut text = format!(
        "cluster database at update {} (committed in view {}; leader {})\n",
        db.seq,
        db.epoch,
        sanitize(db.leader.as_deref().unwrap_or("none"))
    );
    let props = |m: &std::collections::BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| format!("{}={}", sanitize(k), sanitize(v)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut rows = vec![["KIND", "NAME", "DETAILS"].map(String::from).to_vec()];
    for (k, v) in &c.properties {
        rows.push(vec!["property".into(), sanitize(k), sanitize(v)]);
    }
    for (n, p) in &c.nodes {
        rows.push(vec!["node".into(), sanitize(n), props(p)]);
    }
    for g in c.groups.values() {
        let own = c.ownership_of(&g.name);
        let moving = own
            .moving_to
            .as_deref()
            .map(|n| format!(" moving to {}", sanitize(n)))
            .unwrap_or_default();
        let mut details = format!(
            "{} on {} (epoch {}){moving}, desired {}; preferred: {}{}; failback {}; \
             failovers {}/{} per {} ms",
            own.state,
            sanitize(own.owner.as_deref().unwrap_or("none")),
            own.epoch,
            g.desired,
            sanitize(&g.preferred_owners.join(",")),
            if g.any_owner { " then any" } else { "" },
            g.failback,
            own.failovers.len(),
            g.failover_threshold,
            g.failover_period_ms,
        );
        for extra in [sanitize(&own.reason), props(&g.properties)] {
            if !extra.is_empty() {
                details.push_str("; ");
                details.push_str(&extra);
            }
        }
        rows.push(vec!["group".into(), sanitize(&g.name), details]);
    }
    for r in c.resources.values() {
        rows.push(vec![
            "resource".into(),
            sanitize(&r.name),
            format!(
                "group {} kind {} depends on [{}] timeouts {}/{} ms checks {}/{} ms {}",
                sanitize(&r.group),
                sanitize(&r.kind),
                sanitize(&r.depends_on.join(",")),
                r.online_timeout_ms,
                r.offline_timeout_ms,
                r.looks_alive_ms,
                r.is_alive_ms,
                props(&r.properties)
            ),
        ]);
    }
    if rows.len() > 1 {
        text.push_str(&render_table(&rows));
    }
    out.write_all(text.as_bytes()).map_err(output_error)
}

/// `ftctl cluster events`.
fn print_cluster_events(
    events: &[ClusterEvent],
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    for e in events {
        if json {
            json_line(e, out)?;
        } else {
            writeln!(
                out,
                "{}  {}  {}",
                format_local_time(e.time_ms),
                sanitize(&e.kind),
                sanitize(&e.detail)
            )
            .map_err(output_error)?;
        }
    }
    Ok(())
}

/// `ftctl repl status`: one line per (fileset, backup) on a primary, one per fileset on a
/// backup.
fn print_repl(
    filesets: &[crate::repl::FilesetReport],
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    use crate::repl::Role;
    if json {
        for f in filesets {
            let line = serde_json::to_string(f).map_err(|e| CtlError::Unexpected(e.to_string()))?;
            writeln!(out, "{line}").map_err(output_error)?;
        }
        return Ok(());
    }
    let mut rows = vec![
        [
            "FILESET",
            "ROLE",
            "MODE",
            "PEER",
            "STATE",
            "SEQ",
            "ACKED",
            "LAG-OPS",
            "LAG-BYTES",
            "LAG",
        ]
        .map(String::from),
    ];
    for f in filesets {
        let mode = format!("{}/{}", f.mode, if f.sync { "sync" } else { "async" });
        let role = match f.role {
            Role::Primary => "primary",
            Role::Backup => "backup",
            Role::None => "-",
        };
        match (&f.pump, &f.bcplog) {
            (Some(p), _) => {
                for b in &p.backups {
                    rows.push([
                        f.name.clone(),
                        role.into(),
                        mode.clone(),
                        b.name.clone(),
                        b.state.clone(),
                        p.next_seq.saturating_sub(1).to_string(),
                        b.acked.to_string(),
                        b.lag_ops.to_string(),
                        b.lag_bytes.to_string(),
                        format!("{}ms", b.lag_ms),
                    ]);
                }
            }
            (None, Some(b)) => rows.push([
                f.name.clone(),
                role.into(),
                mode.clone(),
                f.primary_node.clone(),
                if b.connected { "connected" } else { "waiting" }.into(),
                b.counters.received.to_string(),
                b.counters.durable.to_string(),
                b.counters
                    .durable
                    .saturating_sub(b.counters.applied)
                    .to_string(),
                b.counters.log_bytes.to_string(),
                format!("applied {}", b.counters.applied),
            ]),
            (None, None) => rows.push([
                f.name.clone(),
                role.into(),
                mode.clone(),
                f.primary_node.clone(),
                f.error
                    .clone()
                    .map_or_else(|| "-".into(), |e| format!("error: {e}")),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]),
        }
    }
    let widths: Vec<usize> = (0..10)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{:<w$}", sanitize(c), w = *w))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end()).map_err(output_error)?;
    }
    Ok(())
}

/// Prints events as they come. A finite listing ends with `End`; a followed one when watchd
/// hangs up. An `Error` inside a followed stream (e.g. watchd telling a slow follower it lost
/// events) is shown and following goes on, but the exit code reports it.
fn stream_events(
    conn: &mut Connection,
    follow: bool,
    json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, CtlError> {
    if follow {
        conn.deadline_per_line = None;
    }
    let mut remote_error = None;
    loop {
        let response = match conn.next()? {
            Some(r) => r,
            None if follow => break,
            None => {
                return Err(CtlError::NoAnswer {
                    path: conn.path.clone(),
                });
            }
        };
        match response {
            Response::Event(event) => {
                if json {
                    let line = serde_json::to_string(&event)
                        .map_err(|e| CtlError::Malformed(e.to_string()))?;
                    writeln!(out, "{line}").map_err(output_error)?;
                } else {
                    writeln!(out, "{}", event_line(&event)).map_err(output_error)?;
                }
                if follow {
                    out.flush().map_err(output_error)?;
                }
            }
            Response::End => break,
            Response::Error { message } if follow => {
                let _ = writeln!(err, "ftctl: watchd: {}", sanitize(&message));
                remote_error = Some(message);
            }
            other => return negative_or_fail(other, err),
        }
    }
    match remote_error {
        Some(message) => Err(CtlError::Remote(message)),
        None => Ok(Outcome::Success),
    }
}

/// `NotFound` is a valid negative answer (exit 1); `Error` and anything that does not fit the
/// question are errors.
fn negative_or_fail(response: Response, err: &mut dyn Write) -> Result<Outcome, CtlError> {
    match response {
        Response::NotFound { what } => {
            let _ = writeln!(err, "ftctl: not found: {}", sanitize(&what));
            Ok(Outcome::Negative)
        }
        Response::Error { message } => Err(CtlError::Remote(sanitize(&message))),
        other => Err(CtlError::Unexpected(response_name(&other).to_owned())),
    }
}

fn response_name(r: &Response) -> &'static str {
    match r {
        Response::Ok { .. } => "ok",
        Response::Status(_) => "status",
        Response::Checkpointed(_) => "checkpointed",
        Response::RolledBack(_) => "rolled_back",
        Response::Repl { .. } => "repl",
        Response::Cluster(_) => "cluster",
        Response::ClusterEvents { .. } => "cluster_events",
        Response::ClusterDb(_) => "cluster_db",
        Response::Groups { .. } => "groups",
        Response::Event(_) => "event",
        Response::End => "end",
        Response::Logs { .. } => "logs",
        Response::NotFound { .. } => "not_found",
        Response::Error { .. } => "error",
    }
}

fn output_error(e: io::Error) -> CtlError {
    if e.kind() == io::ErrorKind::BrokenPipe {
        CtlError::OutputClosed
    } else {
        CtlError::Output(e)
    }
}

/// One connection to watchd: a request line out, answer lines in.
#[derive(Debug)]
struct Connection {
    path: PathBuf,
    timeout: Duration,
    /// Each answer line must arrive within this; `None` while following events.
    deadline_per_line: Option<Duration>,
    reader: BufReader<DeadlineStream>,
}

impl Connection {
    fn open(path: &Path, timeout: Duration) -> Result<Connection, CtlError> {
        let stream = connect(path, timeout)?;
        Ok(Connection {
            path: path.to_owned(),
            timeout,
            deadline_per_line: Some(timeout),
            reader: BufReader::new(DeadlineStream {
                stream,
                deadline: None,
            }),
        })
    }

    fn send(&mut self, request: &Request) -> Result<(), CtlError> {
        let mut line =
            serde_json::to_vec(request).map_err(|e| CtlError::Malformed(e.to_string()))?;
        line.push(b'\n');
        let stream = &mut self.reader.get_mut().stream;
        let sent = stream.set_write_timeout(Some(self.timeout)).and_then(|()| {
            stream.write_all(&line)?;
            stream.flush()
        });
        sent.map_err(|e| self.io_error(e))
    }

    /// The single answer of a non-streaming request.
    fn answer(&mut self) -> Result<Response, CtlError> {
        self.next()?.ok_or_else(|| CtlError::NoAnswer {
            path: self.path.clone(),
        })
    }

    /// The next answer line; `None` when watchd hung up at a line boundary.
    fn next(&mut self) -> Result<Option<Response>, CtlError> {
        self.reader.get_mut().deadline = self.deadline_per_line.map(|d| Instant::now() + d);
        let mut line = Vec::new();
        let read = (&mut self.reader)
            .take(MAX_RESPONSE_LINE + 1)
            .read_until(b'\n', &mut line);
        match read {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(self.io_error(e)),
        }
        if line.last() != Some(&b'\n') {
            if u64::try_from(line.len()).unwrap_or(u64::MAX) > MAX_RESPONSE_LINE {
                return Err(CtlError::Malformed(format!(
                    "an answer line is longer than {MAX_RESPONSE_LINE} bytes"
                )));
            }
            return Err(CtlError::Malformed(
                "watchd hung up in the middle of an answer".into(),
            ));
        }
        serde_json::from_slice(&line).map(Some).map_err(|e| {
            let shown = String::from_utf8_lossy(&line);
            CtlError::Malformed(format!("{e}: {}", excerpt(shown.trim_end())))
        })
    }

    fn io_error(&self, e: io::Error) -> CtlError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CtlError::Timeout {
                path: self.path.clone(),
                after: self.timeout,
            },
            _ => CtlError::Connection {
                path: self.path.clone(),
                source: e,
            },
        }
    }
}

/// A stream whose every read ends by a deadline, so that a server dripping bytes cannot stretch
/// one answer past the timeout.
#[derive(Debug)]
struct DeadlineStream {
    stream: UnixStream,
    deadline: Option<Instant>,
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let limit = match self.deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                Some(left)
            }
            None => None,
        };
        self.stream.set_read_timeout(limit)?;
        self.stream.read(buf)
    }
}

/// Connects within `timeout`. A Unix-socket connect blocks only while the listener's backlog is
/// full (watchd not accepting: hung), so it is done non-blocking and retried until the deadline.
fn connect(path: &Path, timeout: Duration) -> Result<UnixStream, CtlError> {
    let unreachable = |errno: Errno| CtlError::Unreachable {
        path: path.to_owned(),
        reason: errno.desc().to_owned(),
    };
    let addr = UnixAddr::new(path).map_err(unreachable)?;
    let fd = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(unreachable)?;
    let deadline = Instant::now() + timeout;
    loop {
        match nix::sys::socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) if Instant::now() < deadline => std::thread::sleep(CONNECT_RETRY),
            Err(Errno::EAGAIN) => {
                return Err(CtlError::Timeout {
                    path: path.to_owned(),
                    after: timeout,
                });
            }
            Err(errno) => return Err(unreachable(errno)),
        }
    }
    let stream = UnixStream::from(fd);
    stream
        .set_nonblocking(false)
        .map_err(|e| CtlError::Connection {
            path: path.to_owned(),
            source: e,
        })?;
    Ok(stream)
}

fn print_status_json(report: &StatusReport, out: &mut dyn Write) -> Result<(), CtlError> {
    for service in &report.services {
        let line =
            serde_json::to_string(service).map_err(|e| CtlError::Malformed(e.to_string()))?;
        writeln!(out, "{line}").map_err(output_error)?;
    }
    Ok(())
}

const STATUS_HEADER: [&str; 9] = [
    "SERVICE",
    "STATE",
    "PID",
    "UPTIME",
    "RESTARTS",
    "LAST EXIT",
    "HEARTBEATS",
    "CHECKPOINT",
    "STATUS",
];

fn print_status_table(report: &StatusReport, out: &mut dyn Write) -> Result<(), CtlError> {
    let mut rows: Vec<Vec<String>> = vec![STATUS_HEADER.iter().map(|h| (*h).to_owned()).collect()];
    rows.extend(report.services.iter().map(status_row));
    let mut text = String::new();
    text.push_str(&format!(
        "node {}  watchd pid {}  config {}\n",
        sanitize(&report.node),
        report.watchd_pid,
        sanitize(&report.config)
    ));
    text.push_str(&render_table(&rows));
    let l = &report.listener;
    text.push_str(&format!(
        "listener: {} accepted, {} garbage, {} oversized, {} rejected sender\n",
        l.accepted, l.garbage, l.oversized, l.rejected_sender
    ));
    out.write_all(text.as_bytes()).map_err(output_error)
}

fn status_row(s: &ServiceStatus) -> Vec<String> {
    let v: &View = &s.view;
    let dash = || "-".to_owned();
    let state = match v.backoff_ms {
        Some(ms) if v.state == "backoff" => format!("backoff ({} left)", format_millis(ms)),
        _ => v.state.clone(),
    };
    let restarts = if v.restarts_in_window > 0 && v.restarts_in_window != v.restarts {
        format!("{} ({} recent)", v.restarts, v.restarts_in_window)
    } else {
        v.restarts.to_string()
    };
    let status = match (&v.failed_reason, &v.status_text) {
        (Some(reason), _) if v.state == "failed" => reason.clone(),
        (_, Some(text)) => text.clone(),
        _ => String::new(),
    };
    vec![
        s.name.clone(),
        state,
        v.pid.map_or_else(dash, |p| p.to_string()),
        v.uptime_ms.map_or_else(dash, format_millis),
        restarts,
        v.last_exit.map_or_else(dash, |e| e.to_string()),
        heartbeat_cell(v),
        s.transparent
            .as_ref()
            .map_or_else(|| checkpoint_cell(v), transparent_cell),
        if status.is_empty() { dash() } else { status },
    ]
    .into_iter()
    .map(|c| sanitize(&c))
    .collect()
}

/// "-" without a reported checkpoint; else "#seq size, age ago".
fn checkpoint_cell(v: &View) -> String {
    let Some(c) = &v.checkpoint else {
        return "-".into();
    };
    let stream = if c.stream == 0 {
        String::new()
    } else {
        format!("{}:", c.stream)
    };
    format!(
        "{stream}#{} {}, {} ago",
        c.seq,
        format_bytes(c.bytes),
        format_millis(c.age_ms)
    )
}

/// A transparent checkpoint: "T#seq N pages, paused X, age ago" (and failures since).
fn transparent_cell(t: &TransparentStatus) -> String {
    let failures = if t.failures > 0 {
        format!(", {} failed since", t.failures)
    } else {
        String::new()
    };
    format!(
        "T#{} {} pages, paused {}, {} ago{failures}",
        t.seq,
        t.pages,
        format_micros(t.pause_us),
        format_millis(t.age_ms)
    )
}

/// Microseconds for people: `850µs`, `12.3ms`, `1.2s`.
fn format_micros(us: u64) -> String {
    if us < 1000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{}.{}ms", us / 1000, us % 1000 / 100)
    } else {
        format_millis(us / 1000)
    }
}

fn format_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut whole = b;
    let mut rem = 0;
    while whole >= 1024 && unit + 1 < UNITS.len() {
        rem = whole % 1024;
        whole /= 1024;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{whole}.{} {}", rem * 10 / 1024, UNITS[unit])
    }
}

/// "-" without regions; else their count and either how many are overdue or the nearest
/// deadline.
fn heartbeat_cell(v: &View) -> String {
    if v.heartbeats.is_empty() {
        return if v.registered { "0".into() } else { "-".into() };
    }
    let overdue = v.heartbeats.iter().filter(|(_, left)| *left < 0).count();
    if overdue > 0 {
        return format!("{} ({overdue} overdue)", v.heartbeats.len());
    }
    let next = v
        .heartbeats
        .iter()
        .map(|(_, left)| left.unsigned_abs())
        .min()
        .unwrap_or(0);
    format!("{} (next {})", v.heartbeats.len(), format_millis(next))
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
fn render_table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                let pad = widths[c].saturating_sub(cell.chars().count()) + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

fn event_line(e: &EventRecord) -> String {
    format!(
        "{}  {}  {}  {}",
        format_local_time(e.time_ms),
        sanitize(e.service.as_deref().unwrap_or("-")),
        kind_name(e.kind),
        sanitize(&e.detail)
    )
}

/// The kind as it is spelt in JSON (`spawn_failed`), so text and `--json` agree.
fn kind_name(kind: EventKind) -> String {
    match serde_json::to_value(kind) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{kind:?}"),
    }
}

/// Compact durations for a table: `850ms`, `12.3s`, `4m07s`, `2h05m`, `3d04h`.
fn format_millis(ms: u64) -> String {
    const SECOND: u64 = 1000;
    const MINUTE: u64 = 60 * SECOND;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;
    match ms {
        ms if ms < SECOND => format!("{ms}ms"),
        ms if ms < MINUTE => format!("{}.{}s", ms / SECOND, (ms % SECOND) / 100),
        ms if ms < HOUR => format!("{}m{:02}s", ms / MINUTE, (ms % MINUTE) / SECOND),
        ms if ms < DAY => format!("{}h{:02}m", ms / HOUR, (ms % HOUR) / MINUTE),
        ms => format!("{}d{:02}h", ms / DAY, (ms % DAY) / HOUR),
    }
}

/// Local time, RFC 3339 style with milliseconds and the UTC offset:
/// `2025-11-24T08:23:01.123+01:00`. Falls back to UTC if the local time is unknown.
fn format_local_time(time_ms: u64) -> String {
    let utc = || {
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(time_ms)).to_string()
    };
    let Ok(secs) = libc::time_t::try_from(time_ms / 1000) else {
        return utc();
    };
    let mut tm = std::mem::MaybeUninit::<libc::tm>::uninit();
    // SAFETY: `secs` is a valid time_t for the duration of the call, and `tm` points to writable
    // memory of the size and alignment of `libc::tm`; localtime_r is the reentrant variant and
    // keeps no pointer to either after returning.
    let filled = unsafe { libc::localtime_r(&secs, tm.as_mut_ptr()) };
    if filled.is_null() {
        return utc();
    }
    // SAFETY: localtime_r returned non-null, which means it initialised every field of `tm`.
    let tm = unsafe { tm.assume_init() };
    let sign = if tm.tm_gmtoff < 0 { '-' } else { '+' };
    let offset = tm.tm_gmtoff.unsigned_abs();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}{sign}{:02}:{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        time_ms % 1000,
        offset / 3600,
        (offset % 3600) / 60,
    )
}

/// Text from watchd (service status, details) may carry anything a supervised program sent;
/// control characters are escaped so they cannot rewrite the operator's terminal.
fn sanitize(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().collect()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The first part of a malformed line, for an error message.
fn excerpt(text: &str) -> String {
    const SHOWN: usize = 80;
    let mut shown: String = text.chars().take(SHOWN).collect();
    if text.chars().count() > SHOWN {
        shown.push('…');
    }
    format!("`{}`", sanitize(&shown))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::thread::JoinHandle;

    use super::*;
    use crate::api::ListenerCounters;
    use crate::machine::ExitStatus;

    /// A control server on a thread: accepts one connection, reads the request line, lets the
    /// test answer, and hands the request back.
    struct FakeWatchd {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        server: JoinHandle<Request>,
    }

    impl FakeWatchd {
        fn start(answer: impl FnOnce(&Request, &mut UnixStream) + Send + 'static) -> FakeWatchd {
            Self::start_in(tempfile::tempdir().expect("tempdir"), answer)
        }

        fn start_in(
            dir: tempfile::TempDir,
            answer: impl FnOnce(&Request, &mut UnixStream) + Send + 'static,
        ) -> FakeWatchd {
            let socket = dir.path().join(CONTROL_SOCKET);
            let listener = UnixListener::bind(&socket).expect("bind the fake control socket");
            let server = std::thread::spawn(move || {
                let (mut stream, _) = listener.accept().expect("accept");
                let mut line = String::new();
                BufReader::new(stream.try_clone().expect("clone"))
                    .read_line(&mut line)
                    .expect("read request");
                assert!(line.ends_with('\n'), "the request is one line: {line:?}");
                let request: Request =
                    serde_json::from_str(&line).expect("the request is a Request");
                answer(&request, &mut stream);
                request
            });
            FakeWatchd {
                _dir: dir,
                socket,
                server,
            }
        }

        fn socket(&self) -> &str {
            self.socket.to_str().expect("tempdir paths are UTF-8")
        }

        /// What the client asked.
        fn request(self) -> Request {
            self.server.join().expect("the fake server does not panic")
        }
    }

    /// Answers with these lines, ignoring write errors (the client may already be gone).
    fn answer_with(
        responses: Vec<Response>,
    ) -> impl FnOnce(&Request, &mut UnixStream) + Send + 'static {
        move |_, stream| {
            for r in responses {
                let mut line = serde_json::to_vec(&r).expect("serialize");
                line.push(b'\n');
                if stream.write_all(&line).is_err() {
                    return;
                }
            }
        }
    }

    struct Output {
        code: i32,
        stdout: String,
        stderr: String,
    }

    fn ctl_env(args: &[&str], env_socket: Option<&str>) -> Output {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let argv = std::iter::once("ftctl")
            .chain(args.iter().copied())
            .map(OsString::from);
        let code = run_with_env(
            argv,
            env_socket.map(OsString::from),
            &mut stdout,
            &mut stderr,
        );
        Output {
            code,
            stdout: String::from_utf8(stdout).expect("utf-8 stdout"),
            stderr: String::from_utf8(stderr).expect("utf-8 stderr"),
        }
    }

    fn ctl(args: &[&str]) -> Output {
        ctl_env(args, None)
    }

    fn view(state: &str) -> View {
        View {
            state: state.into(),
            pid: None,
            uptime_ms: None,
            restarts: 0,
            restarts_in_window: 0,
            consecutive_failures: 0,
            last_exit: None,
            failed_reason: None,
            status_text: None,
            registered: false,
            heartbeats: Vec::new(),
            backoff_ms: None,
            checkpoint: None,
            readies: 0,
        }
    }

    fn report() -> StatusReport {
        let web = ServiceStatus {
            name: "web".into(),
            cgroup: true,
            view: View {
                pid: Some(4242),
                uptime_ms: Some(125_000),
                restarts: 2,
                last_exit: Some(ExitStatus::Code(3)),
                status_text: Some("serving\x1b[2J".into()),
                registered: true,
                heartbeats: vec![(7, 1500), (8, 900)],
                ..view("running")
            },
            transparent: None,
        };
        let db = ServiceStatus {
            name: "db".into(),
            cgroup: false,
            view: View {
                restarts: 5,
                last_exit: Some(ExitStatus::Signal(9)),
                failed_reason: Some("restart budget exceeded".into()),
                heartbeats: vec![(1, -20)],
                ..view("failed")
            },
            transparent: None,
        };
        StatusReport {
            node: "n1".into(),
            watchd_pid: 77,
            config: "/etc/ftkit/watchd.toml".into(),
            services: vec![web, db],
            listener: ListenerCounters {
                accepted: 10,
                garbage: 1,
                oversized: 2,
                rejected_sender: 3,
            },
        }
    }

    fn event(seq: u64, service: Option<&str>, kind: EventKind, detail: &str) -> EventRecord {
        EventRecord {
            seq,
            time_ms: 1_700_000_000_000 + seq * 1001,
            service: service.map(str::to_owned),
            kind,
            detail: detail.into(),
        }
    }

    #[test]
    fn status_prints_a_table_and_the_listener_counters() {
        let fake = FakeWatchd::start(answer_with(vec![Response::Status(report())]));
        let out = ctl(&["status", "--socket", fake.socket()]);
        assert_eq!(fake.request(), Request::Status);
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(out.stderr, "");
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert!(
            lines[0].contains("node n1") && lines[0].contains("watchd pid 77"),
            "{}",
            out.stdout
        );
        assert!(
            lines[1].starts_with("SERVICE") && lines[1].contains("HEARTBEATS"),
            "{}",
            out.stdout
        );
        let web = lines
            .iter()
            .find(|l| l.starts_with("web "))
            .expect("a web row");
        for cell in [
            "running",
            "4242",
            "2m05s",
            "exit code 3",
            "2 (next 900ms)",
            "serving\\u{1b}[2J",
        ] {
            assert!(web.contains(cell), "{cell:?} missing in {web:?}");
        }
        let db = lines
            .iter()
            .find(|l| l.starts_with("db "))
            .expect("a db row");
        for cell in [
            "failed",
            "signal 9",
            "1 (1 overdue)",
            "restart budget exceeded",
        ] {
            assert!(db.contains(cell), "{cell:?} missing in {db:?}");
        }
        // Columns line up: the STATE column starts at the same offset in every row.
        let at = lines[1].find("STATE").expect("STATE");
        assert_eq!(web.find("running"), Some(at));
        assert_eq!(db.find("failed"), Some(at));
        assert_eq!(
            lines.last(),
            Some(&"listener: 10 accepted, 1 garbage, 2 oversized, 3 rejected sender"),
            "{}",
            out.stdout
        );
    }

    #[test]
    fn status_json_is_one_service_per_line_and_nothing_else() {
        let fake = FakeWatchd::start(answer_with(vec![Response::Status(report())]));
        let out = ctl(&["--socket", fake.socket(), "status", "--json"]);
        assert_eq!(fake.request(), Request::Status);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let parsed: Vec<ServiceStatus> = out
            .stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is a ServiceStatus"))
            .collect();
        assert_eq!(parsed, report().services);
    }

    #[test]
    fn start_stop_restart_reload_print_the_message() {
        let cases: [(&[&str], Request); 4] = [
            (
                &["start", "web"],
                Request::Start {
                    service: "web".into(),
                },
            ),
            (
                &["stop", "web"],
                Request::Stop {
                    service: "web".into(),
                },
            ),
            (
                &["restart", "web"],
                Request::Restart {
                    service: "web".into(),
                },
            ),
            (&["reload"], Request::Reload),
        ];
        for (args, expected) in cases {
            let fake = FakeWatchd::start(answer_with(vec![Response::Ok {
                message: "done it".into(),
            }]));
            let mut argv = vec!["--socket", fake.socket()];
            argv.extend_from_slice(args);
            let out = ctl(&argv);
            assert_eq!(fake.request(), expected);
            assert_eq!(
                (out.code, out.stdout.as_str(), out.stderr.as_str()),
                (0, "done it\n", ""),
                "{args:?}"
            );
        }
    }

    #[test]
    fn not_found_is_a_negative_answer() {
        let fake = FakeWatchd::start(answer_with(vec![Response::NotFound {
            what: "service `nosuch`".into(),
        }]));
        let out = ctl(&["--socket", fake.socket(), "start", "nosuch"]);
        assert_eq!(
            fake.request(),
            Request::Start {
                service: "nosuch".into()
            }
        );
        assert_eq!(out.code, 1);
        assert_eq!(out.stdout, "");
        assert_eq!(out.stderr, "ftctl: not found: service `nosuch`\n");
    }

    #[test]
    fn an_error_answer_exits_2() {
        let fake = FakeWatchd::start(answer_with(vec![Response::Error {
            message: "boom".into(),
        }]));
        let out = ctl(&["--socket", fake.socket(), "stop", "web"]);
        fake.request();
        assert_eq!(out.code, 2);
        assert_eq!(out.stderr, "ftctl: watchd: boom\n");
    }

    #[test]
    fn an_answer_that_does_not_fit_the_question_exits_2() {
        let fake = FakeWatchd::start(answer_with(vec![Response::Ok {
            message: "hm".into(),
        }]));
        let out = ctl(&["--socket", fake.socket(), "status"]);
        fake.request();
        assert_eq!(out.code, 2);
        assert!(out.stderr.contains("unexpected answer"), "{}", out.stderr);
        assert_eq!(out.stdout, "");
    }

    #[test]
    fn no_socket_names_the_path_and_the_os_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.sock");
        let out = ctl(&["--socket", path.to_str().expect("utf-8"), "status"]);
        assert_eq!(out.code, 2);
        assert_eq!(
            out.stderr,
            format!(
                "ftctl: cannot reach watchd at {}: No such file or directory (is watchd running?)\n",
                path.display()
            )
        );
        assert_eq!(out.stdout, "");
    }

    #[test]
    fn a_socket_nobody_listens_on_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.sock");
        drop(UnixListener::bind(&path).expect("bind"));
        let out = ctl(&["--socket", path.to_str().expect("utf-8"), "status"]);
        assert_eq!(out.code, 2);
        assert!(
            out.stderr.contains(&path.display().to_string()),
            "{}",
            out.stderr
        );
        assert!(out.stderr.contains("Connection refused"), "{}", out.stderr);
    }

    #[test]
    fn a_garbage_answer_exits_2() {
        let fake = FakeWatchd::start(|_, stream| {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\x07\n");
        });
        let out = ctl(&["--socket", fake.socket(), "status"]);
        fake.request();
        assert_eq!(out.code, 2);
        assert!(
            out.stderr
                .starts_with("ftctl: malformed answer from watchd: "),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr.contains("HTTP/1.1 200 OK\\u{7}"),
            "{}",
            out.stderr
        );
    }

    #[test]
    fn a_hang_up_without_an_answer_exits_2() {
        let fake = FakeWatchd::start(|_, _| {});
        let out = ctl(&["--socket", fake.socket(), "status"]);
        fake.request();
        assert_eq!(out.code, 2);
        assert!(
            out.stderr.contains("hung up without an answer"),
            "{}",
            out.stderr
        );
    }

    #[test]
    fn a_silent_watchd_times_out() {
        let fake = FakeWatchd::start(|_, stream| {
            // Hold the connection open until the client gives up and closes it.
            let _ = stream.read(&mut [0u8; 1]);
        });
        let started = Instant::now();
        let out = ctl(&["--socket", fake.socket(), "--timeout", "200ms", "status"]);
        let took = started.elapsed();
        fake.request();
        assert_eq!(out.code, 2);
        assert!(
            out.stderr.contains("did not answer within 200ms"),
            "{}",
            out.stderr
        );
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }

    #[test]
    fn a_checkpoint_waits_for_its_answer_longer_than_the_default_timeout() {
        let slow = DEFAULT_TIMEOUT + Duration::from_secs(1);
        let fake = FakeWatchd::start(move |_, stream| {
            // A large dump: the answer comes after the default timeout.
            std::thread::sleep(slow);
            answer_with(vec![Response::Checkpointed(
                crate::api::TransparentCheckpoint {
                    service: "web".into(),
                    pid: 10,
                    seq: 7,
                    parent: None,
                    pages: 262_144,
                    image_bytes: 1 << 30,
                    pause_us: 1000,
                    total_us: 6_000_000,
                    unrestorable: Vec::new(),
                },
            )])(&Request::Reload, stream);
        });
        let started = Instant::now();
        let out = ctl(&["--socket", fake.socket(), "checkpoint", "web"]);
        assert!(started.elapsed() >= slow);
        assert!(matches!(fake.request(), Request::Checkpoint { .. }));
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(out.stdout.contains("checkpoint #7"), "{}", out.stdout);
    }

    #[test]
    fn an_explicit_timeout_bounds_a_checkpoint_too() {
        let fake = FakeWatchd::start(|_, stream| {
            let _ = stream.read(&mut [0u8; 1]);
        });
        let out = ctl(&[
            "--socket",
            fake.socket(),
            "--timeout",
            "200ms",
            "rollback",
            "web",
        ]);
        fake.request();
        assert_eq!(out.code, 2);
        assert!(
            out.stderr.contains("did not answer within 200ms"),
            "{}",
            out.stderr
        );
    }

    #[test]
    fn events_are_listed_until_end() {
        let events = [
            event(1, Some("web"), EventKind::Spawned, "pid 10"),
            event(2, None, EventKind::Reloaded, "config\nreloaded"),
        ];
        let mut answers: Vec<Response> = events.iter().cloned().map(Response::Event).collect();
        answers.push(Response::End);
        let fake = FakeWatchd::start(answer_with(answers));
        let out = ctl(&["--socket", fake.socket(), "events", "--last", "2"]);
        assert_eq!(
            fake.request(),
            Request::Events {
                follow: false,
                last: Some(2)
            }
        );
        assert_eq!(out.code, 0, "{}", out.stderr);
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(lines.len(), 2, "{}", out.stdout);
        assert!(lines[0].ends_with("  web  spawned  pid 10"), "{}", lines[0]);
        assert!(
            lines[1].ends_with("  -  reloaded  config\\nreloaded"),
            "{}",
            lines[1]
        );
        assert_eq!(&lines[0][..2], "20", "starts with the date: {}", lines[0]);
    }

    #[test]
    fn events_json_round_trips() {
        let events = vec![
            event(1, Some("web"), EventKind::SpawnFailed, "no such file"),
            event(
                2,
                Some("web"),
                EventKind::Hang,
                "heartbeat of thread 3 overdue",
            ),
        ];
        let mut answers: Vec<Response> = events.iter().cloned().map(Response::Event).collect();
        answers.push(Response::End);
        let fake = FakeWatchd::start(answer_with(answers));
        let out = ctl(&["--socket", fake.socket(), "events", "--json"]);
        assert_eq!(
            fake.request(),
            Request::Events {
                follow: false,
                last: None
            }
        );
        assert_eq!(out.code, 0, "{}", out.stderr);
        let parsed: Vec<EventRecord> = out
            .stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("an EventRecord"))
            .collect();
        assert_eq!(parsed, events);
    }

    #[test]
    fn a_listing_cut_off_before_end_exits_2() {
        let fake = FakeWatchd::start(answer_with(vec![Response::Event(event(
            1,
            None,
            EventKind::Reloaded,
            "x",
        ))]));
        let out = ctl(&["--socket", fake.socket(), "events"]);
        fake.request();
        assert_eq!(out.code, 2);
        assert_eq!(out.stdout.lines().count(), 1);
    }

    #[test]
    fn follow_prints_events_until_watchd_hangs_up() {
        let answers = (1..=3)
            .map(|i| Response::Event(event(i, Some("web"), EventKind::Exited, &format!("#{i}"))));
        let fake = FakeWatchd::start(answer_with(answers.collect()));
        // The timeout does not apply while following: the server's close ends it, not a timer.
        let out = ctl(&[
            "--socket",
            fake.socket(),
            "--timeout",
            "50ms",
            "events",
            "--follow",
        ]);
        assert_eq!(
            fake.request(),
            Request::Events {
                follow: true,
                last: None
            }
        );
        assert_eq!(out.code, 0, "{}", out.stderr);
        let details: Vec<&str> = out
            .stdout
            .lines()
            .map(|l| l.rsplit("  ").next().expect("a detail"))
            .collect();
        assert_eq!(details, ["#1", "#2", "#3"]);
    }

    #[test]
    fn follow_waits_longer_than_the_timeout() {
        let fake = FakeWatchd::start(|_, stream| {
            std::thread::sleep(Duration::from_millis(300));
            answer_with(vec![Response::Event(event(
                1,
                None,
                EventKind::Reloaded,
                "late",
            ))])(&Request::Reload, stream);
        });
        let out = ctl(&[
            "--socket",
            fake.socket(),
            "--timeout",
            "100ms",
            "events",
            "-f",
            "--json",
        ]);
        fake.request();
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(out.stdout.contains("\"late\""), "{}", out.stdout);
    }

    #[test]
    fn a_closed_stdout_ends_follow_quietly() {
        struct ClosedPipe;
        impl Write for ClosedPipe {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
        }
        let fake = FakeWatchd::start(|_, stream| {
            answer_with(vec![Response::Event(event(
                1,
                None,
                EventKind::Reloaded,
                "x",
            ))])(&Request::Reload, stream);
            // Stay connected: only the closed pipe may end the client.
            let _ = stream.read(&mut [0u8; 1]);
        });
        let mut stderr = Vec::new();
        let argv = ["ftctl", "--socket", fake.socket(), "events", "--follow"].map(OsString::from);
        let code = run_with_env(argv, None, &mut ClosedPipe, &mut stderr);
        fake.request();
        assert_eq!(code, 0);
        assert_eq!(String::from_utf8_lossy(&stderr), "");
    }

    #[test]
    fn logs_print_the_text() {
        let fake = FakeWatchd::start(answer_with(vec![Response::Logs {
            text: "line 1\nline 2".into(),
        }]));
        let out = ctl(&["--socket", fake.socket(), "logs", "web", "--bytes", "100"]);
        assert_eq!(
            fake.request(),
            Request::Logs {
                service: "web".into(),
                max_bytes: Some(100)
            }
        );
        assert_eq!((out.code, out.stdout.as_str()), (0, "line 1\nline 2\n"));
    }

    #[test]
    fn config_names_the_socket_in_its_data_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("watchd.toml");
        std::fs::write(
            &config,
            format!(
                "[watchd]\ndata_dir = {:?}\n",
                dir.path().to_str().expect("utf-8")
            ),
        )
        .expect("write config");
        let fake = FakeWatchd::start_in(
            dir,
            answer_with(vec![Response::Ok {
                message: "reloaded".into(),
            }]),
        );
        let out = ctl(&["--config", config.to_str().expect("utf-8"), "reload"]);
        assert_eq!(fake.request(), Request::Reload);
        assert_eq!(
            (out.code, out.stdout.as_str()),
            (0, "reloaded\n"),
            "{}",
            out.stderr
        );
    }

    #[test]
    fn a_bad_config_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("watchd.toml");
        std::fs::write(&config, "[watchd]\ndata_dri = \"/x\"\n").expect("write config");
        let out = ctl(&["--config", config.to_str().expect("utf-8"), "status"]);
        assert_eq!(out.code, 2);
        assert!(
            out.stderr.starts_with("ftctl: ") && out.stderr.contains("watchd.toml"),
            "{}",
            out.stderr
        );
    }

    #[test]
    fn the_environment_names_the_socket_when_no_flag_does() {
        let fake = FakeWatchd::start(answer_with(vec![Response::Ok {
            message: "ok".into(),
        }]));
        let socket = fake.socket().to_owned();
        let out = ctl_env(
            &["--config", "/nonexistent/watchd.toml", "reload"],
            Some(&socket),
        );
        fake.request();
        assert_eq!(out.code, 0, "{}", out.stderr);
    }

    #[test]
    fn socket_resolution_order() {
        let flag = Path::new("/flag.sock");
        let env = || Some(OsString::from("/env.sock"));
        let missing = Path::new("/nonexistent/watchd.toml");
        assert_eq!(
            resolve_socket(Some(flag), env(), Some(missing)).expect("flag"),
            flag
        );
        assert_eq!(
            resolve_socket(None, env(), Some(missing)).expect("env"),
            Path::new("/env.sock")
        );
        assert!(matches!(
            resolve_socket(None, Some(OsString::new()), Some(missing)),
            Err(CtlError::Config(_))
        ));
        assert_eq!(
            resolve_socket(None, None, None).expect("default"),
            Path::new(DEFAULT_DATA_DIR).join(CONTROL_SOCKET)
        );
    }

    #[test]
    fn usage_errors_exit_2_and_help_exits_0() {
        for args in [
            &["frobnicate"][..],
            &["start"],
            &["status", "--timeout", "0s"],
            &["events", "--last", "x"],
            &[],
        ] {
            let out = ctl(args);
            assert_eq!(out.code, 2, "{args:?}");
            assert!(!out.stderr.is_empty(), "{args:?}");
        }
        let out = ctl(&["--help"]);
        assert_eq!(out.code, 0);
        assert!(out.stdout.contains("Usage"), "{}", out.stdout);
        assert_eq!(out.stderr, "");
    }

    #[test]
    fn durations_and_text_are_rendered_for_people() {
        assert_eq!(format_millis(850), "850ms");
        assert_eq!(format_millis(12_345), "12.3s");
        assert_eq!(format_millis(247_000), "4m07s");
        assert_eq!(format_millis(7_500_000), "2h05m");
        assert_eq!(format_millis(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
        assert_eq!(sanitize("plain"), "plain");
        assert_eq!(sanitize("a\tb\u{1b}"), "a\\tb\\u{1b}");
        let t = format_local_time(1_700_000_000_123);
        assert_eq!(t.len(), "2023-11-14T22:13:20.123+00:00".len(), "{t}");
        assert!(t.contains(".123"), "{t}");
        assert_eq!(kind_name(EventKind::SpawnFailed), "spawn_failed");
    }

    fn cluster_status() -> ClusterStatus {
        use crate::node::report::{NodeReport, QuorumReport};
        use crate::node::transport::{LinkReport, TransportStats};
        use cluster::membership::NodeState;
        let node = |name: &str, state, me, since: Option<u64>| NodeReport {
            name: name.into(),
            state,
            me,
            reachable: !me && state != NodeState::Offline,
            member_since: since,
            links: if me {
                Vec::new()
            } else {
                vec![LinkReport {
                    network: "net0".into(),
                    address: "10.0.0.2:7400".into(),
                    connected: state != NodeState::Offline,
                    heard_ms_ago: Some(if state == NodeState::Offline {
                        4200
                    } else {
                        35
                    }),
                }]
            },
        };
        ClusterStatus {
            cluster: "demo".into(),
            node: "a".into(),
            incarnation: 3,
            running: true,
            left: false,
            epoch: 5,
            members: vec!["a".into(), "b".into()],
            coordinator: "a".into(),
            acting: true,
            quorum: QuorumReport {
                kind: "disk".into(),
                has_quorum: true,
                votes: 3,
                needed: 3,
                total: 4,
                disk: Some("/srv/qd".into()),
                disk_owner: Some("a".into()),
            },
            realtime: true,
            nodes: vec![
                node("a", NodeState::Online, true, Some(1)),
                node("b", NodeState::Paused, false, Some(4)),
                node("c", NodeState::Offline, false, None),
            ],
            transport: TransportStats::default(),
            db_seq: 7,
            db_leader: Some("a".into()),
        }
    }

    #[test]
    fn cluster_status_shows_view_quorum_acting_and_nodes() {
        let fake = FakeWatchd::start(answer_with(vec![Response::Cluster(Box::new(
            cluster_status(),
        ))]));
        let out = ctl(&["--socket", fake.socket(), "cluster", "status"]);
        assert_eq!(fake.request(), Request::ClusterStatus);
        assert_eq!(out.code, 0, "{}", out.stderr);
        for needle in [
            "epoch 5: a b",
            "yes (3 of 4 votes, 3 needed; disk)",
            "/srv/qd (owner: a)",
            "a (incarnation 3, real-time)",
            "update 7 (leader: a)",
        ] {
            assert!(out.stdout.contains(needle), "{needle:?} in\n{}", out.stdout);
        }
        let acting = out
            .stdout
            .lines()
            .find(|l| l.starts_with("acting"))
            .expect("an acting line");
        assert!(acting.ends_with("yes"), "{acting}");
        let b = out
            .stdout
            .lines()
            .find(|l| l.starts_with("b "))
            .expect("a row for b");
        assert!(
            b.contains("paused") && b.contains("epoch 4") && b.contains("net0 up (heard 35ms ago)"),
            "{b}"
        );
        let c = out
            .stdout
            .lines()
            .find(|l| l.starts_with("c "))
            .expect("a row for c");
        assert!(
            c.contains("offline") && c.contains("net0 down (heard 4.2s ago)"),
            "{c}"
        );

        let fake = FakeWatchd::start(answer_with(vec![Response::Cluster(Box::new(
            cluster_status(),
        ))]));
        let out = ctl(&["--socket", fake.socket(), "cluster", "status", "--json"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let parsed: ClusterStatus = serde_json::from_str(out.stdout.trim()).expect("one object");
        assert_eq!(parsed, cluster_status());

        let fake = FakeWatchd::start(answer_with(vec![Response::Cluster(Box::new(
            cluster_status(),
        ))]));
        let out = ctl(&["--socket", fake.socket(), "cluster", "nodes", "--json"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let states: Vec<String> = out
            .stdout
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("json line");
                v["state"].as_str().expect("state").to_owned()
            })
            .collect();
        assert_eq!(states, ["online", "paused", "offline"]);
    }

    #[test]
    fn cluster_events_and_node_commands() {
        let events = vec![ClusterEvent {
            seq: 1,
            time_ms: 1_700_000_000_000,
            kind: "suspected".into(),
            detail: "c stopped answering on every network".into(),
        }];
        let fake = FakeWatchd::start(answer_with(vec![Response::ClusterEvents {
            events: events.clone(),
        }]));
        let out = ctl(&[
            "--socket",
            fake.socket(),
            "cluster",
            "events",
            "--last",
            "3",
        ]);
        assert_eq!(fake.request(), Request::ClusterEvents { last: Some(3) });
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(
            out.stdout
                .contains("  suspected  c stopped answering on every network"),
            "{}",
            out.stdout
        );
        let db = DbReport {
            seq: 2,
            epoch: 4,
            leader: Some("a".into()),
            content: cluster::db::DbContent {
                properties: [("color".to_owned(), "blue".to_owned())].into(),
                groups: [(
                    "web".to_owned(),
                    cluster::db::Group {
                        name: "web".into(),
                        preferred_owners: vec!["a".into(), "b".into()],
                        ..Default::default()
                    },
                )]
                .into(),
                ownership: [(
                    "web".to_owned(),
                    cluster::db::Ownership {
                        owner: Some("b".into()),
                        epoch: 3,
                        state: cluster::db::GroupState::Online,
                        reason: "b reported online".into(),
                        ..Default::default()
                    },
                )]
                .into(),
                ..Default::default()
            },
        };
        let fake = FakeWatchd::start(answer_with(vec![Response::ClusterDb(Box::new(db))]));
        let out = ctl(&["--socket", fake.socket(), "cluster", "db"]);
        assert_eq!(fake.request(), Request::ClusterDb);
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(
            out.stdout
                .starts_with("cluster database at update 2 (committed in view 4; leader a)")
                && out.stdout.contains("property  color  blue")
                && out.stdout.contains(
                    "group     web    online on b (epoch 3), desired online; preferred: a,b; \
                     failback never; failovers 0/3 per 3600000 ms; b reported online"
                ),
            "{}",
            out.stdout
        );
        let out = ctl(&[
            "--socket",
            "/nonexistent",
            "cluster",
            "update",
            "{\"op\":\"nope\"}",
        ]);
        assert_eq!(out.code, 2);
        assert!(
            out.stderr.contains("not a cluster database update"),
            "{}",
            out.stderr
        );
        let cases: [(&[&str], Request, Response, i32); 6] = [
            (
                &["node", "pause", "b"],
                Request::NodePause {
                    node: "b".into(),
                    paused: true,
                },
                Response::Ok {
                    message: "pause of b requested".into(),
                },
                0,
            ),
            (
                &["node", "resume", "b"],
                Request::NodePause {
                    node: "b".into(),
                    paused: false,
                },
                Response::NotFound {
                    what: "node `b`".into(),
                },
                1,
            ),
            (
                &["node", "leave", "b"],
                Request::NodeLeave { node: "b".into() },
                Response::Error {
                    message: "a node leaves on its own".into(),
                },
                2,
            ),
            (
                &["cluster", "status"],
                Request::ClusterStatus,
                Response::NotFound {
                    what: "cluster: this watchd has no [cluster] table".into(),
                },
                1,
            ),
            (
                &["cluster", "set", "color", "red"],
                Request::ClusterUpdate {
                    update: cluster::gum::Update::SetProperty {
                        key: "color".into(),
                        value: "red".into(),
                    },
                },
                Response::Ok {
                    message: "update 3 committed".into(),
                },
                0,
            ),
            (
                &["cluster", "unset", "size"],
                Request::ClusterUpdate {
                    update: cluster::gum::Update::DeleteProperty { key: "size".into() },
                },
                Response::NotFound {
                    what: "property `size`".into(),
                },
                1,
            ),
        ];
        for (args, request, response, code) in cases {
            let fake = FakeWatchd::start(answer_with(vec![response]));
            let mut argv = vec!["--socket", fake.socket()];
            argv.extend_from_slice(args);
            let out = ctl(&argv);
            assert_eq!(fake.request(), request, "{args:?}");
            assert_eq!(out.code, code, "{args:?}: {} {}", out.stdout, out.stderr);
        }
    }
}
