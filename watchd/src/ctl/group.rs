//! `ftctl group apply|status|move|online|offline` and `ftctl resource status`: reading a group
//! file (TOML, errors with line and column), the requests, and the tables. Every change is
//! watchd's (through global updates); this only asks and shows.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use cluster::db::Desired;

use super::{CtlError, Outcome, json_line, negative_or_fail, output_error, render_table, sanitize};
use crate::api::{Request, Response};
use crate::group::apply::{GroupFile, GroupReport, GroupRequest};

/// `ftctl group ...`.
#[derive(Debug, Subcommand)]
pub(super) enum GroupCommand {
    /// Define or change groups and their resources from a TOML file (`[[group]]` with
    /// `[[group.resource]]`); the whole file is checked before anything changes.
    Apply {
        /// The group file.
        file: PathBuf,
    },
    /// Every group: owner, epoch, state, a move in progress, the last reason, failovers in the
    /// period, and its resources (their state when this node runs the group).
    Status {
        /// One JSON object per group per line.
        #[arg(long)]
        json: bool,
    },
    /// Move a group gracefully: offline in order on its owner, then online in order on NODE
    /// (the best other node when omitted).
    Move {
        /// The group.
        group: String,
        /// Where to.
        #[arg(long, value_name = "NODE")]
        to: Option<String>,
    },
    /// Want the group online (also the retry of a group the cluster gave up on).
    Online {
        /// The group.
        group: String,
    },
    /// Want the group offline everywhere.
    Offline {
        /// The group.
        group: String,
    },
}

/// `ftctl resource ...`.
#[derive(Debug, Subcommand)]
pub(super) enum ResourceCommand {
    /// Every resource: group, kind, dependencies, owner, state (when this node runs its group).
    Status {
        /// One JSON object per resource per line.
        #[arg(long)]
        json: bool,
    },
}

/// Reads and parses a group file.
pub(super) fn read_file(path: &Path) -> Result<GroupFile, CtlError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CtlError::Usage(format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text)
        .map_err(|e| CtlError::Usage(format!("{}: {}", path.display(), e.to_string().trim_end())))
}

/// The request of a group command.
pub(super) fn group_request(c: &GroupCommand) -> Result<Request, CtlError> {
    let request = match c {
        GroupCommand::Apply { file } => GroupRequest::Apply {
            file: read_file(file)?,
        },
        GroupCommand::Status { .. } => GroupRequest::Status,
        GroupCommand::Move { group, to } => GroupRequest::Move {
            group: group.clone(),
            to: to.clone(),
        },
        GroupCommand::Online { group } => GroupRequest::Desired {
            group: group.clone(),
            desired: Desired::Online,
        },
        GroupCommand::Offline { group } => GroupRequest::Desired {
            group: group.clone(),
            desired: Desired::Offline,
        },
    };
    Ok(Request::Group { request })
}

/// The request of a resource command.
pub(super) fn resource_request(_: &ResourceCommand) -> Request {
    Request::Group {
        request: GroupRequest::Status,
    }
}

/// Shows watchd's answer to a group command.
pub(super) fn group_answer(
    c: &GroupCommand,
    response: Response,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, CtlError> {
    match (c, response) {
        (GroupCommand::Status { json }, Response::Groups { groups }) => {
            if *json {
                for g in &groups {
                    json_line(g, out)?;
                }
            } else {
                out.write_all(groups_table(&groups).as_bytes())
                    .map_err(output_error)?;
            }
            Ok(Outcome::Success)
        }
        (GroupCommand::Status { .. }, other) => negative_or_fail(other, err),
        (_, Response::Ok { message }) => {
            writeln!(out, "{}", sanitize(&message)).map_err(output_error)?;
            Ok(Outcome::Success)
        }
        (_, other) => negative_or_fail(other, err),
    }
}

/// Shows watchd's answer to a resource command.
pub(super) fn resource_answer(
    c: &ResourceCommand,
    response: Response,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, CtlError> {
    let ResourceCommand::Status { json } = c;
    let Response::Groups { groups } = response else {
        return negative_or_fail(response, err);
    };
    if *json {
        for g in &groups {
            for r in &g.resources {
                let mut v =
                    serde_json::to_value(r).map_err(|e| CtlError::Unexpected(e.to_string()))?;
                if let Some(o) = v.as_object_mut() {
                    o.insert("owner".into(), serde_json::json!(g.owner));
                    o.insert("epoch".into(), serde_json::json!(g.epoch));
                    o.insert("group_state".into(), serde_json::json!(g.state));
                }
                json_line(&v, out)?;
            }
        }
        return Ok(Outcome::Success);
    }
    let mut rows = vec![
        [
            "RESOURCE",
            "GROUP",
            "KIND",
            "DEPENDS ON",
            "OWNER",
            "STATE",
            "DETAIL",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for g in &groups {
        for r in &g.resources {
            rows.push(vec![
                sanitize(&r.name),
                sanitize(&r.group),
                sanitize(&r.kind),
                dash(&r.depends_on.join(",")),
                dash(g.owner.as_deref().unwrap_or("")),
                r.state.as_deref().map_or_else(|| "-".into(), sanitize),
                dash(&r.detail),
            ]);
        }
    }
    out.write_all(render_table(&rows).as_bytes())
        .map_err(output_error)?;
    Ok(Outcome::Success)
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        sanitize(s)
    }
}

/// The groups, then each group's resources indented below it.
fn groups_table(groups: &[GroupReport]) -> String {
    let mut rows = vec![
        [
            "GROUP",
            "OWNER",
            "EPOCH",
            "STATE",
            "DESIRED",
            "MOVING TO",
            "FAILOVERS",
            "REASON",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for g in groups {
        rows.push(vec![
            sanitize(&g.name),
            dash(g.owner.as_deref().unwrap_or("")),
            g.epoch.to_string(),
            g.state.to_string(),
            g.desired.to_string(),
            dash(g.moving_to.as_deref().unwrap_or("")),
            format!("{}/{}", g.failovers_in_period, g.failover_threshold),
            dash(&g.reason),
        ]);
        for r in &g.resources {
            rows.push(vec![
                format!("  {}", sanitize(&r.name)),
                sanitize(&r.kind),
                String::new(),
                r.state.as_deref().map_or_else(|| "-".into(), sanitize),
                String::new(),
                String::new(),
                String::new(),
                dash(&r.detail),
            ]);
        }
    }
    render_table(&rows)
}
