//! Naming under the orders inotify really queues events in, over a fake file system whose
//! watches belong to directories (inodes), not to paths, as the kernel's do.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

/// Directories by path, each with its inode; watches by inode.
#[derive(Debug, Default)]
struct FakeFs {
    dirs: BTreeMap<PathBuf, u64>,
    next_ino: u64,
    wds: BTreeMap<u64, i32>,
    next_wd: i32,
    removed: Vec<i32>,
}

impl FakeFs {
    fn mkdir(&mut self, p: &str) {
        self.next_ino += 1;
        self.dirs.insert(PathBuf::from(p), self.next_ino);
    }

    /// rename(2) of a directory: the inodes (and so the watches) move with it.
    fn rename(&mut self, from: &str, to: &str) {
        let moved: Vec<(PathBuf, u64)> = self
            .dirs
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, &i)| (p.clone(), i))
            .collect();
        for (p, ino) in moved {
            self.dirs.remove(&p);
            let rest = p.strip_prefix(from).expect("beneath");
            let to = if rest.as_os_str().is_empty() {
                PathBuf::from(to)
            } else {
                Path::new(to).join(rest)
            };
            self.dirs.insert(to, ino);
        }
    }

    /// The watch descriptor of the directory now at `p` (it must be watched).
    fn wd(&self, p: &str) -> i32 {
        let ino = self.dirs[Path::new(p)];
        self.wds[&ino]
    }
}

impl WatchIo for FakeFs {
    fn add(&mut self, path: &Path, _root: bool) -> io::Result<i32> {
        let Some(&ino) = self.dirs.get(path) else {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        };
        if let Some(&wd) = self.wds.get(&ino) {
            return Ok(wd);
        }
        self.next_wd += 1;
        self.wds.insert(ino, self.next_wd);
        Ok(self.next_wd)
    }

    fn remove(&mut self, wd: i32) {
        self.wds.retain(|_, w| *w != wd);
        self.removed.push(wd);
    }

    fn subdirs(&mut self, dir: &Path) -> Vec<PathBuf> {
        self.dirs
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .cloned()
            .collect()
    }
}

fn raw(wd: i32, mask: ReadFlags, cookie: u32, name: &str) -> RawEvent {
    RawEvent {
        wd,
        mask,
        cookie,
        name: Some(name.as_bytes().to_vec()),
    }
}

/// What each output says, compactly: kind, path, tracker.
fn show(outs: &[Out]) -> Vec<String> {
    outs.iter()
        .map(|o| match o {
            Ok(e) => format!(
                "{:?} {} {:?}",
                e.kind,
                e.paths
                    .first()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                e.tracker()
            ),
            Err(e) => format!("error: {e}"),
        })
        .collect()
}

fn from(p: &str, t: usize) -> String {
    format!("Modify(Name(From)) {p} Some({t})")
}

fn to(p: &str, t: usize) -> String {
    format!("Modify(Name(To)) {p} Some({t})")
}

fn paths(ps: &[&str]) -> BTreeSet<PathBuf> {
    ps.iter().map(PathBuf::from).collect()
}

const DIR_FROM: ReadFlags = ReadFlags::MOVED_FROM.union(ReadFlags::ISDIR);
const DIR_TO: ReadFlags = ReadFlags::MOVED_TO.union(ReadFlags::ISDIR);

/// The run that failed: `mv d e; mkdir new; mv e/sub new/sub`, all done before the watch
/// thread read anything, so `new` was not watched when `sub` arrived in it (no MOVED_TO), and
/// the MOVED_FROM of `sub` was queued on the watch of `d`. notify named it `d/sub` or dropped
/// it (it had replaced the watches of `d`); it must be `e/sub`, completed by `new/sub` (found
/// when `new` was watched), and events queued before that rename must name `e/sub`.
#[test]
fn copy_watch_names_a_rename_out_of_a_renamed_directory_by_its_new_path() {
    let mut fs = FakeFs::default();
    for d in ["/r", "/r/d", "/r/d/sub"] {
        fs.mkdir(d);
    }
    let mut namer = Namer::new(PathBuf::from("/r"), &mut fs).expect("watches");
    let (root, d, sub) = (fs.wd("/r"), fs.wd("/r/d"), fs.wd("/r/d/sub"));
    fs.rename("/r/d", "/r/e");
    fs.mkdir("/r/new");
    fs.rename("/r/e/sub", "/r/new/sub");
    let mut outs = Vec::new();
    for ev in [
        raw(root, DIR_FROM, 1, "d"),
        raw(root, DIR_TO, 1, "e"),
        raw(root, ReadFlags::CREATE | ReadFlags::ISDIR, 0, "new"),
        // Queued while `sub` was still in `e`.
        raw(sub, ReadFlags::CREATE, 0, "y"),
        raw(d, DIR_FROM, 2, "sub"),
    ] {
        outs.extend(namer.on_raw(ev, &mut fs));
    }
    assert!(namer.end_of_batch(&mut fs).is_empty());
    assert_eq!(
        show(&outs),
        vec![
            from("/r/d", 1),
            to("/r/e", 1),
            "Create(Folder) /r/new None".to_owned(),
            "Create(File) /r/e/sub/y None".to_owned(),
            from("/r/e/sub", 2),
            to("/r/new/sub", 2),
        ]
    );
    // Had the watch of `new` come just in time for the kernel to queue the second half too,
    // that one is not reported twice.
    let new = fs.wd("/r/new");
    assert!(namer.on_raw(raw(new, DIR_TO, 2, "sub"), &mut fs).is_empty());
    // `sub` was found (with the same watch) when `new` was watched; the half-seen rename
    // out of `e` drops nothing that is still in the tree.
    assert_eq!(
        namer.watched(),
        paths(&["/r", "/r/e", "/r/new", "/r/new/sub"])
    );
    assert!(fs.removed.is_empty(), "{:?}", fs.removed);
    // Later events in the moved directory carry its current path.
    let sub = fs.wd("/r/new/sub");
    let outs = namer.on_raw(raw(sub, ReadFlags::CREATE, 0, "x"), &mut fs);
    assert_eq!(
        show(&outs),
        vec!["Create(File) /r/new/sub/x None".to_owned()]
    );
}

/// The same renames read one at a time: every event is named by the path its directory had
/// when the kernel queued it, and both halves of the second rename are reported.
#[test]
fn copy_watch_names_events_by_the_path_at_queue_time() {
    let mut fs = FakeFs::default();
    for d in ["/r", "/r/d", "/r/d/sub", "/r/new"] {
        fs.mkdir(d);
    }
    let mut namer = Namer::new(PathBuf::from("/r"), &mut fs).expect("watches");
    let (root, d, sub, new) = (
        fs.wd("/r"),
        fs.wd("/r/d"),
        fs.wd("/r/d/sub"),
        fs.wd("/r/new"),
    );
    // Queued before the renames, read after them: named by the old paths.
    let mut outs = namer.on_raw(raw(sub, ReadFlags::MODIFY, 0, "big"), &mut fs);
    fs.rename("/r/d", "/r/e");
    fs.rename("/r/e/sub", "/r/new/sub");
    for ev in [
        raw(root, DIR_FROM, 1, "d"),
        raw(root, DIR_TO, 1, "e"),
        raw(d, DIR_FROM, 2, "sub"),
        raw(new, DIR_TO, 2, "sub"),
        raw(sub, ReadFlags::CLOSE_WRITE, 0, "big"),
    ] {
        outs.extend(namer.on_raw(ev, &mut fs));
    }
    assert!(namer.end_of_batch(&mut fs).is_empty());
    assert_eq!(
        show(&outs),
        vec![
            "Modify(Data(Any)) /r/d/sub/big None".to_owned(),
            from("/r/d", 1),
            to("/r/e", 1),
            from("/r/e/sub", 2),
            to("/r/new/sub", 2),
            "Access(Close(Write)) /r/new/sub/big None".to_owned(),
        ]
    );
    assert_eq!(
        namer.watched(),
        paths(&["/r", "/r/e", "/r/new", "/r/new/sub"])
    );
    assert!(fs.removed.is_empty());
}

/// A directory moved out of the tree loses its watches; its late events are dropped, and an
/// event from inside it between the halves of a rename is reported as lost (a rescan).
#[test]
fn copy_watch_drops_directories_moved_out_and_reports_what_it_cannot_name() {
    let mut fs = FakeFs::default();
    for d in ["/r", "/r/out", "/r/out/deep", "/r/keep"] {
        fs.mkdir(d);
    }
    let mut namer = Namer::new(PathBuf::from("/r"), &mut fs).expect("watches");
    let (root, deep) = (fs.wd("/r"), fs.wd("/r/out/deep"));
    fs.rename("/r/out", "/elsewhere");
    let outs = namer.on_raw(raw(root, DIR_FROM, 5, "out"), &mut fs);
    assert_eq!(show(&outs), vec![from("/r/out", 5)]);
    assert!(namer.end_of_batch(&mut fs).is_empty());
    assert_eq!(namer.watched(), paths(&["/r", "/r/keep"]));
    assert_eq!(fs.removed.len(), 2);
    assert!(
        namer
            .on_raw(raw(deep, ReadFlags::CREATE, 0, "x"), &mut fs)
            .is_empty()
    );
    // A late second half of that rename cannot be trusted.
    fs.rename("/elsewhere", "/r/back");
    let outs = namer.on_raw(raw(root, DIR_TO, 5, "back"), &mut fs);
    assert!(
        outs.first().is_some_and(Result::is_err),
        "{:?}",
        show(&outs)
    );
    assert_eq!(
        namer.watched(),
        paths(&["/r", "/r/keep", "/r/back", "/r/back/deep"])
    );
    // Between the halves of a rename, an event from inside the renamed directory.
    let keep = fs.wd("/r/keep");
    fs.mkdir("/r/keep/inner");
    let _ = namer.on_raw(
        raw(keep, ReadFlags::CREATE | ReadFlags::ISDIR, 0, "inner"),
        &mut fs,
    );
    let inner = fs.wd("/r/keep/inner");
    let _ = namer.on_raw(raw(root, DIR_FROM, 6, "keep"), &mut fs);
    let outs = namer.on_raw(raw(inner, ReadFlags::MODIFY, 0, "f"), &mut fs);
    assert!(
        outs.first().is_some_and(Result::is_err),
        "{:?}",
        show(&outs)
    );
}

/// A rescan re-watches the tree as it is now and drops the watches of anything gone.
#[test]
fn copy_watch_rewatch_follows_the_tree_as_it_is() {
    let mut fs = FakeFs::default();
    for d in ["/r", "/r/a", "/r/b"] {
        fs.mkdir(d);
    }
    let mut namer = Namer::new(PathBuf::from("/r"), &mut fs).expect("watches");
    // Changes whose events were lost (queue overflow).
    fs.rename("/r/a", "/r/c");
    fs.dirs.remove(Path::new("/r/b"));
    fs.mkdir("/r/c/new");
    let outs = namer.on_raw(
        RawEvent {
            wd: -1,
            mask: ReadFlags::QUEUE_OVERFLOW,
            cookie: 0,
            name: None,
        },
        &mut fs,
    );
    assert!(outs[0].as_ref().is_ok_and(notify::Event::need_rescan));
    assert!(namer.rewatch(&mut fs).is_empty());
    assert_eq!(namer.watched(), paths(&["/r", "/r/c", "/r/c/new"]));
    assert_eq!(
        fs.removed.len(),
        1,
        "the watch of the removed directory is dropped"
    );
}

/// A watched directory found inside a new one whose MOVED_FROM never comes: where it was is
/// unknown to the engine, so a rescan is asked for, and it is watched under its new path.
#[test]
fn copy_watch_a_move_without_its_first_half_is_reported_as_lost() {
    let mut fs = FakeFs::default();
    for d in ["/r", "/r/a", "/r/a/sub"] {
        fs.mkdir(d);
    }
    let mut namer = Namer::new(PathBuf::from("/r"), &mut fs).expect("watches");
    let root = fs.wd("/r");
    fs.mkdir("/r/new");
    fs.rename("/r/a/sub", "/r/new/sub");
    let outs = namer.on_raw(
        raw(root, ReadFlags::CREATE | ReadFlags::ISDIR, 0, "new"),
        &mut fs,
    );
    assert_eq!(show(&outs), vec!["Create(Folder) /r/new None".to_owned()]);
    let outs = namer.end_of_batch(&mut fs);
    assert_eq!(outs.len(), 1);
    assert!(outs[0].is_err(), "{:?}", show(&outs));
    assert_eq!(
        namer.watched(),
        paths(&["/r", "/r/a", "/r/new", "/r/new/sub"])
    );
}
