//! The `fileset` and `checkpoint` resources: a group-managed replicated directory
//! (`[[fileset]] primary = "group"`) whose primary is the node where the group is online.
//! Online makes this node the fileset's primary with the group's ownership epoch (its replica
//! drained first), offline makes it a backup again; the checks read the pump's state. A
//! `checkpoint` resource is the same over a service's checkpoint directory in copy mode, so
//! each image the owner commits reaches the other owners and a standby recovers from the newest.
//! Its in-flight images (`.tmp-*`) are excluded by default ([`copy_exclude`]), so each image
//! travels once, after it was committed.
//!
//! It only asks the replication supervisor ([`crate::repl::ReplMsg`]); it never touches the
//! files, the ring or the stream itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ractor::ActorRef;
use repl::copy::{Exclude, ExcludeError, NamePattern};

use super::resource::{Health, ResourceError};
use crate::config::{FilesetConfig, FilesetMode};
use crate::repl::{FilesetReport, ReplMsg, Role, RoleRequest, RoleState};
use crate::supervisor::Shared;

/// The property naming the fileset.
pub const FILESET_PROPERTY: &str = "fileset";
/// The property naming the service whose checkpoint directory a `checkpoint` resource
/// replicates (checked against the fileset's path). A checkpoint resource needs both `service`
/// and `fileset`, in the cluster database's validation and here alike.
pub const SERVICE_PROPERTY: &str = "service";
/// The optional property bounding how far a streaming backup may lag (ms) before is-alive
/// calls the resource failed.
pub const MAX_LAG_PROPERTY: &str = "max_lag_ms";
/// Default bound of a streaming backup's lag.
pub const DEFAULT_MAX_LAG: Duration = Duration::from_secs(60);
/// The quiet interval suggested for a checkpoint directory in copy mode: images are written
/// with the atomic recipe (complete when renamed into place), so a short wait suffices and a
/// standby gets each image almost as soon as it is committed.
pub const SUGGESTED_CHECKPOINT_QUIET: Duration = Duration::from_millis(20);
/// A checkpoint fileset with a longer quiet interval than this is accepted with a warning:
/// every image reaches the standby only that long after it was committed.
pub const CHECKPOINT_QUIET_WARNING: Duration = Duration::from_millis(200);
/// What a copy-mode fileset over a service's checkpoint directory excludes on top of its own
/// `exclude` list: the checkpoint store's in-flight images (`ckpt::store` writes
/// `.tmp-<seq>-<pid>` and renames it to `<seq>.ckpt` on commit). Copying them would ship
/// every image again at each quiet gap while it is written, then once more when committed.
pub const CHECKPOINT_TEMP_EXCLUDE: &str = ".tmp-*";
/// How long one question to the replication supervisor may take, apart from role changes
/// (those are bounded by the resource's online and offline timeouts).
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a role change may take at most from here (the caller's timeout is shorter).
const ROLE_CHANGE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// What the resource replicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replicated {
    /// Any directory (`fileset`).
    Files,
    /// A service's checkpoint directory, in copy mode (`checkpoint`); the service when named.
    Checkpoints {
        /// The service whose `FT_CKPT_DIR` the fileset must be.
        service: Option<String>,
    },
}

/// A validated `fileset` or `checkpoint` resource.
#[derive(Debug)]
pub struct FilesetResource {
    fileset: String,
    what: Replicated,
    max_lag: Duration,
    /// The replication supervisor of this node.
    repl: ActorRef<ReplMsg>,
    /// watchd's data directory (where services' checkpoint directories are).
    data_dir: PathBuf,
    /// This node's name.
    node: String,
}

impl FilesetResource {
    /// Validates the properties: `fileset` (a fileset name) is required; `max_lag_ms` is
    /// optional; a checkpoint resource also needs its `service`. Whether the fileset exists on
    /// this node and is group-managed is checked when it goes online (the replication
    /// supervisor knows).
    pub fn from_properties(
        properties: &BTreeMap<String, String>,
        what: Replicated,
        shared: &Shared,
    ) -> Result<FilesetResource, ResourceError> {
        let repl = shared
            .repl
            .get()
            .cloned()
            .ok_or_else(|| ResourceError::BadProperty {
                property: FILESET_PROPERTY.to_owned(),
                why: "this node replicates no files (its configuration has no [cluster])".into(),
            })?;
        FilesetResource::with_supervisor(properties, what, repl, &shared.data_dir, &shared.node)
    }

    /// Like [`FilesetResource::from_properties`], with the replication supervisor, the data
    /// directory and the node name given.
    pub fn with_supervisor(
        properties: &BTreeMap<String, String>,
        what: Replicated,
        repl: ActorRef<ReplMsg>,
        data_dir: &Path,
        node: &str,
    ) -> Result<FilesetResource, ResourceError> {
        let bad = |property: &str, why: String| ResourceError::BadProperty {
            property: property.to_owned(),
            why,
        };
        let fileset = properties.get(FILESET_PROPERTY).ok_or_else(|| {
            bad(
                FILESET_PROPERTY,
                "missing (the name of a [[fileset]])".into(),
            )
        })?;
        if !crate::config::cluster::valid_name(fileset) {
            return Err(bad(
                FILESET_PROPERTY,
                format!("`{fileset}` is not a valid fileset name"),
            ));
        }
        let max_lag = match properties.get(MAX_LAG_PROPERTY) {
            None => DEFAULT_MAX_LAG,
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis)
                .ok_or_else(|| {
                    bad(
                        MAX_LAG_PROPERTY,
                        format!("`{v}` is not a positive number of milliseconds"),
                    )
                })?,
        };
        let what = match what {
            // The same properties the cluster database requires of a checkpoint resource.
            Replicated::Checkpoints { .. } => Replicated::Checkpoints {
                service: Some(properties.get(SERVICE_PROPERTY).cloned().ok_or_else(|| {
                    bad(
                        SERVICE_PROPERTY,
                        "missing (the service whose checkpoint directory the fileset carries)"
                            .into(),
                    )
                })?),
            },
            Replicated::Files => Replicated::Files,
        };
        Ok(FilesetResource {
            fileset: fileset.clone(),
            what,
            max_lag,
            repl,
            data_dir: data_dir.to_owned(),
            node: node.to_owned(),
        })
    }

    /// The fileset.
    pub fn fileset(&self) -> &str {
        &self.fileset
    }

    /// What it replicates.
    pub fn replicated(&self) -> &Replicated {
        &self.what
    }

    /// Makes this node the fileset's primary for `epoch` (its replica drained first).
    pub async fn online(&self, epoch: u64) -> Result<(), ResourceError> {
        self.check_config().await?;
        let state = self
            .set_role(RoleRequest::Primary {
                epoch,
                backups: None,
            })
            .await?;
        if state.role == Role::Primary && state.running {
            Ok(())
        } else {
            Err(self.io(format!(
                "the pump does not run{}",
                state.error.map(|e| format!(": {e}")).unwrap_or_default()
            )))
        }
    }

    /// Makes this node a backup of the fileset again (its last writes handed to the backups
    /// first, within a bound).
    pub async fn offline(&self) -> Result<(), ResourceError> {
        self.set_role(RoleRequest::Backup).await.map(|_| ())
    }

    /// The role is primary and the pump runs.
    pub async fn looks_alive(&self) -> Result<Health, ResourceError> {
        let repl = &self.repl;
        let state = ractor::call_t!(
            repl,
            |reply| ReplMsg::Role {
                fileset: self.fileset.clone(),
                reply
            },
            millis(QUERY_TIMEOUT)
        )
        .map_err(|e| self.io(format!("the replication supervisor did not answer: {e}")))?
        .map_err(|e| self.io(e))?;
        Ok(role_health(&state))
    }

    /// Like looks-alive, and the backups are in a sane state: streaming within the lag bound,
    /// or (re)connecting or resyncing; none refuses this pump (a backup that refuses it has
    /// seen a newer epoch: this node's ownership is stale).
    pub async fn is_alive(&self) -> Result<Health, ResourceError> {
        let health = self.looks_alive().await?;
        if health != Health::Online {
            return Ok(health);
        }
        let repl = &self.repl;
        let reports = ractor::call_t!(repl, ReplMsg::Status, millis(QUERY_TIMEOUT))
            .map_err(|e| self.io(format!("the replication supervisor did not answer: {e}")))?;
        let report = reports
            .into_iter()
            .find(|r| r.name == self.fileset)
            .ok_or_else(|| self.io("not reported by the replication supervisor".into()))?;
        Ok(stream_health(&report, self.max_lag))
    }

    async fn set_role(&self, role: RoleRequest) -> Result<RoleState, ResourceError> {
        let repl = &self.repl;
        ractor::call_t!(
            repl,
            |reply| ReplMsg::SetRole {
                fileset: self.fileset.clone(),
                role,
                reply
            },
            millis(ROLE_CHANGE_TIMEOUT)
        )
        .map_err(|e| self.io(format!("the replication supervisor did not answer: {e}")))?
        .map_err(|e| self.io(e))
    }

    /// The fileset exists here, is group-managed, and (checkpoint) is a copy-mode fileset over
    /// the service's checkpoint directory.
    async fn check_config(&self) -> Result<(), ResourceError> {
        let repl = &self.repl;
        let config = ractor::call_t!(
            repl,
            |reply| ReplMsg::Config {
                fileset: self.fileset.clone(),
                reply
            },
            millis(QUERY_TIMEOUT)
        )
        .map_err(|e| self.io(format!("the replication supervisor did not answer: {e}")))?;
        let Some((config, member)) = config else {
            return Err(self.bad(format!(
                "no [[fileset]] named `{}` on this node",
                self.fileset
            )));
        };
        check_fileset(&config, member, &self.what, &self.data_dir, &self.node)
            .map_err(|why| self.bad(why))
    }

    fn io(&self, why: String) -> ResourceError {
        ResourceError::Io {
            what: format!("fileset `{}`", self.fileset),
            source: std::io::Error::other(why),
        }
    }

    fn bad(&self, why: String) -> ResourceError {
        ResourceError::BadProperty {
            property: FILESET_PROPERTY.to_owned(),
            why,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The exclude list copy mode uses for the fileset `config`, whose directory on this node is
/// `root` (canonical): its own `exclude` list, plus [`CHECKPOINT_TEMP_EXCLUDE`] when `root` is a
/// service's checkpoint directory (`<data_dir>/ckpt/<service>`, the directory a `checkpoint`
/// resource requires, see [`check_fileset`]). Known before any resource goes online, since the
/// pump may start as soon as the fileset's role is set.
pub fn copy_exclude(
    config: &FilesetConfig,
    root: &Path,
    data_dir: &Path,
) -> Result<Exclude, ExcludeError> {
    let own = config.exclude()?;
    if config.mode != FilesetMode::Copy || !is_checkpoint_dir(root, data_dir) {
        return Ok(own);
    }
    own.with(NamePattern::new(CHECKPOINT_TEMP_EXCLUDE)?)
}

/// Whether `root` is a directory of watchd's checkpoint directories (`<data_dir>/ckpt/*`).
fn is_checkpoint_dir(root: &Path, data_dir: &Path) -> bool {
    let ckpt = data_dir.join("ckpt");
    let ckpt = std::fs::canonicalize(&ckpt).unwrap_or(ckpt);
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
    root.parent() == Some(ckpt.as_path())
}

/// Why the fileset `config` cannot back a resource of kind `what` on `node`, if it cannot.
pub fn check_fileset(
    config: &FilesetConfig,
    member: bool,
    what: &Replicated,
    data_dir: &Path,
    node: &str,
) -> Result<(), String> {
    let name = config.name();
    if !config.group_managed() {
        return Err(format!(
            "fileset `{name}` has a fixed primary (primary = \"{}\"); a group's fileset needs primary = \"group\"",
            config.primary
        ));
    }
    if !member {
        return Err(format!(
            "node {node} does not hold fileset `{name}` (add it to the fileset's `backups`)"
        ));
    }
    if let Replicated::Checkpoints { service } = what {
        if config.mode != FilesetMode::Copy {
            return Err(format!(
                "fileset `{name}` is in replay mode; checkpoint images are written by the checkpoint store, not through the ring: use mode = \"copy\""
            ));
        }
        if let Some(service) = service {
            let expected = data_dir.join("ckpt").join(service);
            let same = match (
                std::fs::canonicalize(&config.path),
                std::fs::canonicalize(&expected),
            ) {
                (Ok(a), Ok(b)) => a == b,
                _ => config.path == expected,
            };
            if !same {
                return Err(format!(
                    "fileset `{name}` is {}, but service `{service}` keeps its checkpoints in {}",
                    config.path.display(),
                    expected.display()
                ));
            }
        }
        if config.quiet > CHECKPOINT_QUIET_WARNING {
            tracing::warn!(
                fileset = %name, quiet = ?config.quiet, suggested = ?SUGGESTED_CHECKPOINT_QUIET,
                "a checkpoint fileset with a long quiet interval: each image reaches the standby only that long after it was committed"
            );
        }
    }
    Ok(())
}

/// Looks-alive's verdict from the role.
fn role_health(state: &RoleState) -> Health {
    match (state.role, state.running) {
        (Role::Primary, true) => Health::Online,
        (Role::Primary, false) => Health::Failed(format!(
            "the pump does not run{}",
            state
                .error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )),
        (Role::Backup | Role::None, _) => Health::Offline,
    }
}

/// Is-alive's verdict from the pump's report.
fn stream_health(report: &FilesetReport, max_lag: Duration) -> Health {
    let Some(pump) = &report.pump else {
        return Health::Failed("the pump does not answer".into());
    };
    if let Some(e) = &pump.source_error {
        return Health::Failed(format!("the pump's source failed: {e}"));
    }
    let bound = millis(max_lag);
    for b in &pump.backups {
        // A refusal by a node that knows a newer epoch fences this pump; any other refusal
        // (a node that is still the primary of an older epoch, and will be taken offline) is
        // a backup not available yet.
        if let Some(why) = &b.refused
            && b.refused_epoch > pump.epoch
        {
            return Health::Failed(format!(
                "backup {} refuses this pump (epoch {}; it knows epoch {}): {why}",
                b.name, pump.epoch, b.refused_epoch
            ));
        }
        if b.state == "streaming" && b.lag_ms > bound {
            return Health::Failed(format!(
                "backup {} lags {} ms behind (bound {bound} ms)",
                b.name, b.lag_ms
            ));
        }
    }
    Health::Online
}

#[cfg(test)]
mod tests {
    use repl::primary::{BackupLinkStatus, PrimaryStatus};

    use super::*;

    fn fileset(text: &str) -> FilesetConfig {
        let config = crate::config::Config::parse(
            Path::new("t.toml"),
            &format!(
                "[watchd]\nnode = \"a\"\n\n[cluster]\nname = \"c\"\nsecret_file = \"s\"\nlisten = [\"10.0.0.1:1\"]\n\n\
                 [[node]]\nname = \"b\"\naddresses = [\"10.0.0.2:1\"]\n\n[[fileset]]\nname = \"f\"\n{text}\n"
            ),
        )
        .expect("valid");
        config.filesets[0].clone()
    }

    #[test]
    fn the_fileset_must_be_group_managed_and_held_here() {
        let dir = Path::new("/var/lib/ftkit");
        let fixed = fileset("path = \"/srv/f\"\nprimary = \"a\"\nbackups = [\"b\"]");
        let err = check_fileset(&fixed, true, &Replicated::Files, dir, "a").expect_err("fixed");
        assert!(err.contains("primary = \"group\""), "{err}");
        let managed = fileset("path = \"/srv/f\"\nprimary = \"group\"\nbackups = [\"a\", \"b\"]");
        assert!(check_fileset(&managed, true, &Replicated::Files, dir, "a").is_ok());
        let err =
            check_fileset(&managed, false, &Replicated::Files, dir, "c").expect_err("not held");
        assert!(err.contains("does not hold"), "{err}");
    }

    #[test]
    fn a_checkpoint_fileset_is_a_copy_of_the_service_s_checkpoint_directory() {
        let dir = Path::new("/var/lib/ftkit");
        let ckpt = |service: Option<&str>| Replicated::Checkpoints {
            service: service.map(str::to_owned),
        };
        let replay = fileset(
            "path = \"/var/lib/ftkit/ckpt/kv\"\nprimary = \"group\"\nbackups = [\"a\", \"b\"]",
        );
        let err = check_fileset(&replay, true, &ckpt(None), dir, "a").expect_err("replay");
        assert!(err.contains("mode = \"copy\""), "{err}");
        let copy = fileset(
            "path = \"/var/lib/ftkit/ckpt/kv\"\nprimary = \"group\"\nbackups = [\"a\", \"b\"]\nmode = \"copy\"\nquiet = \"20ms\"",
        );
        assert!(check_fileset(&copy, true, &ckpt(None), dir, "a").is_ok());
        assert!(check_fileset(&copy, true, &ckpt(Some("kv")), dir, "a").is_ok());
        let err = check_fileset(&copy, true, &ckpt(Some("other")), dir, "a").expect_err("other");
        assert!(err.contains("/var/lib/ftkit/ckpt/other"), "{err}");
    }

    #[test]
    fn a_checkpoint_directory_excludes_in_flight_images_on_top_of_its_own_list() {
        let data = tempfile::tempdir().expect("tempdir");
        let ckpt = data.path().join("ckpt/kv");
        let other = data.path().join("files");
        std::fs::create_dir_all(&ckpt).expect("mkdir");
        std::fs::create_dir_all(&other).expect("mkdir");
        let patterns = |ex: Exclude| -> Vec<String> {
            ex.patterns().iter().map(ToString::to_string).collect()
        };
        let config = |path: &Path, extra: &str| {
            fileset(&format!(
                "path = \"{}\"\nprimary = \"group\"\nbackups = [\"a\", \"b\"]\n{extra}",
                path.display()
            ))
        };
        let copy = "mode = \"copy\"\nquiet = \"20ms\"";
        let exclude = |path: &Path, extra: &str| {
            copy_exclude(&config(path, extra), path, data.path()).expect("valid")
        };
        assert_eq!(patterns(exclude(&ckpt, copy)), [CHECKPOINT_TEMP_EXCLUDE]);
        assert_eq!(
            patterns(exclude(
                &ckpt,
                &format!("{copy}\nexclude = [\"*.swp\", \".tmp-*\"]")
            )),
            ["*.swp", CHECKPOINT_TEMP_EXCLUDE],
            "its own list, plus the temp files once"
        );
        assert!(exclude(&other, copy).is_empty(), "any other directory");
        assert_eq!(
            patterns(exclude(&other, &format!("{copy}\nexclude = [\"*.swp\"]"))),
            ["*.swp"]
        );
        // A replay fileset over the directory (refused by the checkpoint resource) gets none.
        assert!(exclude(&ckpt, "").is_empty());
        // Names as the checkpoint store makes them: `.tmp-<seq>-<pid>` in flight, then
        // `<seq:020>.ckpt`.
        let ex = exclude(&ckpt, copy);
        assert!(ex.excludes(format!(".tmp-7-{}", std::process::id()).as_bytes()));
        assert!(!ex.excludes(format!("{:020}.ckpt", 7).as_bytes()));
    }

    fn report(backups: Vec<BackupLinkStatus>) -> FilesetReport {
        FilesetReport {
            name: "f".into(),
            role: Role::Primary,
            mode: "replay".into(),
            sync: false,
            path: "/srv/f".into(),
            primary_node: "a".into(),
            epoch: 4,
            pump: Some(PrimaryStatus {
                generation: 1,
                next_seq: 10,
                released: 9,
                retained_ops: 0,
                retained_bytes: 0,
                backups,
                source_error: None,
                epoch: 4,
                idle_reads: 0,
            }),
            bcplog: None,
            error: None,
        }
    }

    fn link(state: &str, lag_ms: u64, refused: Option<(&str, u64)>) -> BackupLinkStatus {
        BackupLinkStatus {
            name: "b".into(),
            connected: state != "down",
            state: state.into(),
            acked: 9,
            lag_ops: 0,
            lag_bytes: 0,
            lag_ms,
            resyncs: 0,
            refused: refused.map(|r| r.0.to_owned()),
            refused_epoch: refused.map_or(0, |r| r.1),
        }
    }

    #[test]
    fn is_alive_judges_the_backups() {
        let bound = Duration::from_secs(1);
        for state in ["streaming", "down", "greeting", "resyncing"] {
            assert_eq!(
                stream_health(&report(vec![link(state, 10, None)]), bound),
                Health::Online,
                "{state}"
            );
        }
        // Reconnecting or resyncing for long is not a lag.
        assert_eq!(
            stream_health(&report(vec![link("resyncing", 5000, None)]), bound),
            Health::Online
        );
        let lagging = stream_health(&report(vec![link("streaming", 5000, None)]), bound);
        assert!(
            matches!(&lagging, Health::Failed(w) if w.contains("lags 5000 ms")),
            "{lagging}"
        );
        let fenced = stream_health(
            &report(vec![link(
                "down",
                0,
                Some(("stale epoch 4: this backup has seen epoch 5", 5)),
            )]),
            bound,
        );
        assert!(
            matches!(&fenced, Health::Failed(w) if w.contains("refuses this pump (epoch 4; it knows epoch 5)")),
            "{fenced}"
        );
        // A stale primary refusing the new owner's pump does not fail the new owner.
        let waiting = link(
            "down",
            0,
            Some(("node b is the primary of fileset f (epoch 3)", 3)),
        );
        assert_eq!(stream_health(&report(vec![waiting]), bound), Health::Online);
    }

    #[test]
    fn looks_alive_is_the_role() {
        let state = |role, running| RoleState {
            role,
            epoch: 3,
            running,
            error: None,
        };
        assert_eq!(role_health(&state(Role::Primary, true)), Health::Online);
        assert!(matches!(
            role_health(&state(Role::Primary, false)),
            Health::Failed(_)
        ));
        assert_eq!(role_health(&state(Role::Backup, true)), Health::Offline);
        assert_eq!(role_health(&state(Role::None, false)), Health::Offline);
    }
}
