//! Interpretation of `notify` events (inotify underneath) as [`WatchEvent`]s confined to the
//! fileset root. Owns the rule that only paths strictly beneath the root become [`RelPath`]s;
//! it must never let a path outside the root through, and never panic on an odd name.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RemoveKind, RenameMode};

use super::engine::{EntryKind, WatchEvent};
use super::exclude::Exclude;
use crate::RelPath;

/// Where a path reported by the watcher lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// Strictly beneath the root.
    Inside(RelPath),
    /// The root itself.
    Root,
    /// Not beneath the root.
    Outside,
    /// Beneath the root but not representable as a [`RelPath`] (too long).
    Unrepresentable(String),
}

/// Locates `path` relative to the (canonical) `root`, by whole components.
pub fn locate(root: &Path, path: &Path) -> Located {
    let Ok(rel) = path.strip_prefix(root) else {
        return Located::Outside;
    };
    let bytes = rel.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Located::Root;
    }
    match RelPath::new(bytes) {
        Ok(p) => Located::Inside(p),
        Err(e) => Located::Unrepresentable(e.to_string()),
    }
}

/// Whether a report can matter at all. Checked on notify's thread before queueing: inotify also
/// reports every open and every close after reading (ours included), and a tree being read
/// (by the application, by a resync's scan) must not fill the queue and cause a rescan.
pub fn may_matter(res: &notify::Result<notify::Event>) -> bool {
    match res {
        Ok(ev) => {
            ev.need_rescan()
                || !matches!(ev.kind, EventKind::Access(k) if k != AccessKind::Close(AccessMode::Write))
        }
        Err(_) => true,
    }
}

/// Whether a report concerns excluded paths only and can be dropped before the queue. Halves of
/// renames are never dropped here: the engine pairs them (a rename from an excluded name is a
/// copy, one to an excluded name a removal).
pub fn only_excluded(root: &Path, exclude: &Exclude, res: &notify::Result<notify::Event>) -> bool {
    let Ok(ev) = res else {
        return false;
    };
    if exclude.is_empty()
        || ev.need_rescan()
        || ev.paths.is_empty()
        || matches!(ev.kind, EventKind::Modify(ModifyKind::Name(_)))
    {
        return false;
    }
    ev.paths.iter().all(|p| match locate(root, p) {
        Located::Inside(rel) => exclude.excludes(rel.as_bytes()),
        Located::Root | Located::Outside | Located::Unrepresentable(_) => false,
    })
}

/// Turns one report of the watcher into what the engine needs to know, if anything.
pub fn interpret(root: &Path, res: notify::Result<notify::Event>) -> Option<WatchEvent> {
    let ev = match res {
        Ok(ev) => ev,
        Err(e) => {
            // Watch limits, read errors: events may be missing from now on.
            return Some(WatchEvent::Rescan {
                why: format!("the watcher reported an error: {e}"),
            });
        }
    };
    if ev.need_rescan() {
        return Some(WatchEvent::Rescan {
            why: "the watcher lost events (inotify queue overflow)".into(),
        });
    }
    let kind = ev.kind;
    match kind {
        // Reads and opens change nothing (our own reads report these too).
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return None,
        EventKind::Any | EventKind::Other => {
            return Some(WatchEvent::Rescan {
                why: format!("the watcher reported an event it could not classify: {kind:?}"),
            });
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
            // inotify reports each rename as From then To first; the pair is matched by the
            // engine from those (by cookie), so this summary adds nothing.
            return None;
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::Any | RenameMode::Other)) => {
            return Some(WatchEvent::Rescan {
                why: "the watcher reported a rename without its direction".into(),
            });
        }
        _ => {}
    }
    let Some(first) = ev.paths.first() else {
        return Some(WatchEvent::Rescan {
            why: format!("the watcher reported {kind:?} without a path"),
        });
    };
    let path = match locate(root, first) {
        Located::Inside(p) => p,
        Located::Root => {
            return match kind {
                EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) => {
                    tracing::error!(root = %root.display(), "copy mode: the fileset root was removed or moved");
                    Some(WatchEvent::Rescan {
                        why: "the fileset root was removed or moved".into(),
                    })
                }
                _ => None,
            };
        }
        Located::Outside => {
            tracing::debug!(path = %first.display(), "copy mode: event outside the root ignored");
            return None;
        }
        Located::Unrepresentable(why) => {
            tracing::warn!(path = %first.display(), why, "copy mode: path not replicated");
            return None;
        }
    };
    Some(match kind {
        EventKind::Create(_) => WatchEvent::Created { path },
        EventKind::Remove(k) => WatchEvent::Removed {
            path,
            kind: match k {
                RemoveKind::File => Some(EntryKind::File),
                RemoveKind::Folder => Some(EntryKind::Dir),
                RemoveKind::Any | RemoveKind::Other => None,
            },
        },
        EventKind::Modify(ModifyKind::Name(RenameMode::From)) => match ev.tracker() {
            Some(tracker) => WatchEvent::RenameFrom { path, tracker },
            None => WatchEvent::Rescan {
                why: format!("{path:?} was renamed away without a cookie"),
            },
        },
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => WatchEvent::RenameTo {
            path,
            tracker: ev.tracker(),
        },
        // Data, metadata (chmod, utimes, link count) and the close of a written file.
        _ => WatchEvent::Changed { path },
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::path::PathBuf;

    use notify::event::{CreateKind, DataChange, Flag};
    use notify::{Event, EventKind};

    use super::*;

    fn root() -> PathBuf {
        PathBuf::from("/srv/data")
    }

    fn at(kind: EventKind, path: &str) -> notify::Result<Event> {
        Ok(Event::new(kind).add_path(PathBuf::from(path)))
    }

    fn rel(s: &[u8]) -> RelPath {
        RelPath::new(s).expect("valid")
    }

    #[test]
    fn copy_overflow_flag_and_watcher_errors_become_rescans() {
        let overflow = Event::new(EventKind::Other).set_flag(Flag::Rescan);
        assert!(matches!(
            interpret(&root(), Ok(overflow)),
            Some(WatchEvent::Rescan { .. })
        ));
        // A rescan flag wins over whatever kind the event has.
        let flagged = Event::new(EventKind::Modify(ModifyKind::Data(DataChange::Any)))
            .add_path(PathBuf::from("/srv/data/a"))
            .set_flag(Flag::Rescan);
        assert!(matches!(
            interpret(&root(), Ok(flagged)),
            Some(WatchEvent::Rescan { .. })
        ));
        let err = notify::Error::new(notify::ErrorKind::MaxFilesWatch);
        assert!(matches!(
            interpret(&root(), Err(err)),
            Some(WatchEvent::Rescan { .. })
        ));
        assert!(matches!(
            interpret(&root(), Ok(Event::new(EventKind::Any))),
            Some(WatchEvent::Rescan { .. })
        ));
    }

    #[test]
    fn copy_reads_are_dropped_before_the_queue() {
        let access =
            |k| Ok(Event::new(EventKind::Access(k)).add_path(PathBuf::from("/srv/data/x")));
        assert!(!may_matter(&access(AccessKind::Open(AccessMode::Any))));
        assert!(!may_matter(&access(AccessKind::Close(AccessMode::Read))));
        assert!(!may_matter(&access(AccessKind::Read)));
        assert!(may_matter(&access(AccessKind::Close(AccessMode::Write))));
        assert!(may_matter(&at(
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            "/srv/data/x"
        )));
        let flagged = Event::new(EventKind::Access(AccessKind::Read)).set_flag(Flag::Rescan);
        assert!(may_matter(&Ok(flagged)));
        assert!(may_matter(&Err(notify::Error::generic("boom"))));
    }

    #[test]
    fn copy_paths_outside_the_root_are_ignored_and_inside_become_relpaths() {
        let ev = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert_eq!(interpret(&root(), at(ev, "/srv/database/x")), None);
        assert_eq!(interpret(&root(), at(ev, "/etc/passwd")), None);
        assert_eq!(
            interpret(&root(), at(ev, "/srv/data/d/x")),
            Some(WatchEvent::Changed { path: rel(b"d/x") })
        );
        // Events about the root itself: only its disappearance matters.
        assert_eq!(interpret(&root(), at(ev, "/srv/data")), None);
        assert!(matches!(
            interpret(
                &root(),
                at(EventKind::Remove(RemoveKind::Other), "/srv/data")
            ),
            Some(WatchEvent::Rescan { .. })
        ));
        // Reads are not changes.
        assert_eq!(
            interpret(
                &root(),
                at(
                    EventKind::Access(AccessKind::Close(AccessMode::Read)),
                    "/srv/data/x"
                )
            ),
            None
        );
        assert_eq!(
            interpret(
                &root(),
                at(
                    EventKind::Access(AccessKind::Close(AccessMode::Write)),
                    "/srv/data/x"
                )
            ),
            Some(WatchEvent::Changed { path: rel(b"x") })
        );
    }

    #[test]
    fn copy_odd_names_are_kept_byte_for_byte() {
        let mut raw = b"/srv/data/d\xff\xfe/new\nline \x01".to_vec();
        let path = PathBuf::from(OsStr::from_bytes(&raw));
        let got = interpret(
            &root(),
            Ok(Event::new(EventKind::Create(CreateKind::File)).add_path(path)),
        );
        raw.drain(..b"/srv/data/".len());
        assert_eq!(got, Some(WatchEvent::Created { path: rel(&raw) }));
        // A path beyond PATH_MAX is reported, not turned into an invalid RelPath.
        let long = format!("/srv/data/{}", "x/".repeat(3000));
        assert_eq!(
            interpret(
                &root(),
                at(
                    EventKind::Create(CreateKind::File),
                    long.trim_end_matches('/')
                )
            ),
            None
        );
    }

    #[test]
    fn copy_renames_carry_their_cookie_and_removals_their_kind() {
        let from = Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::From)))
            .add_path(PathBuf::from("/srv/data/a"))
            .set_tracker(7);
        assert_eq!(
            interpret(&root(), Ok(from)),
            Some(WatchEvent::RenameFrom {
                path: rel(b"a"),
                tracker: 7
            })
        );
        let to = Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::To)))
            .add_path(PathBuf::from("/srv/data/b"))
            .set_tracker(7);
        assert_eq!(
            interpret(&root(), Ok(to)),
            Some(WatchEvent::RenameTo {
                path: rel(b"b"),
                tracker: Some(7)
            })
        );
        let both = Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::Both)))
            .add_path(PathBuf::from("/srv/data/a"))
            .add_path(PathBuf::from("/srv/data/b"))
            .set_tracker(7);
        assert_eq!(interpret(&root(), Ok(both)), None);
        assert_eq!(
            interpret(
                &root(),
                at(EventKind::Remove(RemoveKind::Folder), "/srv/data/d")
            ),
            Some(WatchEvent::Removed {
                path: rel(b"d"),
                kind: Some(EntryKind::Dir)
            })
        );
        assert_eq!(
            interpret(
                &root(),
                at(EventKind::Remove(RemoveKind::File), "/srv/data/f")
            ),
            Some(WatchEvent::Removed {
                path: rel(b"f"),
                kind: Some(EntryKind::File)
            })
        );
    }

    #[test]
    fn copy_events_of_excluded_paths_are_dropped_before_the_queue_but_renames_are_kept() {
        let ex = Exclude::new([".tmp-*"]).expect("valid");
        let data = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        let dropped = |kind, path: &str| only_excluded(&root(), &ex, &at(kind, path));
        assert!(dropped(data, "/srv/data/.tmp-3-77"));
        assert!(dropped(
            EventKind::Create(CreateKind::File),
            "/srv/data/sub/.tmp-3-77"
        ));
        assert!(dropped(
            EventKind::Remove(RemoveKind::File),
            "/srv/data/.tmp-3-77"
        ));
        assert!(dropped(data, "/srv/data/.tmp-dir/inside"));
        assert!(!dropped(data, "/srv/data/00000000000000000003.ckpt"));
        assert!(
            !dropped(data, "/elsewhere/.tmp-1"),
            "outside the root: interpret decides"
        );
        for mode in [RenameMode::From, RenameMode::To] {
            assert!(!dropped(
                EventKind::Modify(ModifyKind::Name(mode)),
                "/srv/data/.tmp-3-77"
            ));
        }
        assert!(!only_excluded(
            &root(),
            &Exclude::default(),
            &at(data, "/srv/data/.tmp-3-77")
        ));
        let overflow = Event::new(EventKind::Other)
            .add_path(PathBuf::from("/srv/data/.tmp-1"))
            .set_flag(Flag::Rescan);
        assert!(!only_excluded(&root(), &ex, &Ok(overflow)));
    }
}
