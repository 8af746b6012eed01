use std::collections::BTreeMap;

use super::*;
use crate::quorum::MemDisk;

fn group(name: &str) -> Group {
    Group {
        name: name.into(),
        preferred_owners: vec!["n1".into(), "n2".into()],
        ..Group::default()
    }
}

fn resource(name: &str, group: &str, deps: &[&str]) -> Resource {
    Resource {
        name: name.into(),
        group: group.into(),
        kind: "service".into(),
        depends_on: deps.iter().map(|d| (*d).to_string()).collect(),
        properties: [("service".to_string(), format!("{name}-svc"))].into(),
        ..Resource::default()
    }
}

fn set(key: &str, value: &str) -> Update {
    Update::SetProperty {
        key: key.into(),
        value: value.into(),
    }
}

/// A database with a node, a group and two dependent resources.
fn populated() -> DbSnapshot {
    let mut s = DbSnapshot::default();
    for u in [
        set("cluster.name", "lab"),
        Update::AddNode { node: "n1".into() },
        Update::SetNodeProperty {
            node: "n1".into(),
            key: "rack".into(),
            value: "r1".into(),
        },
        Update::AddGroup(group("web")),
        Update::AddResource(resource("ip", "web", &[])),
        Update::AddResource(resource("httpd", "web", &["ip"])),
    ] {
        s.apply(3, &u).expect("valid update");
    }
    s
}

#[test]
fn updates_apply_in_order_and_bad_ones_change_nothing() {
    let s = populated();
    assert_eq!(s.seq, 6);
    assert_eq!(s.epoch, 3);
    assert_eq!(s.content.properties["cluster.name"], "lab");
    assert_eq!(s.content.nodes["n1"]["rack"], "r1");
    assert_eq!(s.content.resources["httpd"].depends_on, ["ip"]);

    let refused = |u: Update| -> UpdateError {
        let mut t = s.clone();
        let e = t.apply(4, &u).expect_err("refused");
        assert_eq!(t, s, "a refused update changed the database");
        assert!(!e.to_string().is_empty());
        e
    };
    assert!(matches!(
        refused(Update::RemoveGroup {
            name: "nope".into()
        }),
        UpdateError::NotFound { .. }
    ));
    assert!(matches!(
        refused(Update::RemoveGroup { name: "web".into() }),
        UpdateError::InUse { .. }
    ));
    assert!(matches!(
        refused(Update::AddGroup(group("web"))),
        UpdateError::Exists { .. }
    ));
    assert!(matches!(
        refused(Update::AddResource(resource("db", "nogroup", &[]))),
        UpdateError::NotFound { .. }
    ));
    assert!(matches!(
        refused(Update::AddResource(resource("ip", "web", &[]))),
        UpdateError::Exists { .. }
    ));
    assert!(matches!(
        refused(Update::AddResource(resource("x", "web", &["ghost"]))),
        UpdateError::BadDependency { .. }
    ));
    assert!(matches!(
        refused(Update::AddResource(resource("x", "web", &["ip", "ip"]))),
        UpdateError::BadDependency { .. }
    ));
    assert!(matches!(
        refused(Update::RemoveResource { name: "ip".into() }),
        UpdateError::InUse { .. }
    ));
    // A cycle: ip -> httpd -> ip.
    let e = refused(Update::SetResource(resource("ip", "web", &["httpd"])));
    assert!(e.to_string().contains("cycle"), "{e}");
    assert!(matches!(
        refused(Update::SetResource(resource("ip", "web", &["ip"]))),
        UpdateError::BadDependency { .. }
    ));
    assert!(matches!(
        refused(Update::SetNodeProperty {
            node: "n9".into(),
            key: "k".into(),
            value: "v".into()
        }),
        UpdateError::NotFound { .. }
    ));
    assert!(matches!(
        refused(Update::DeleteProperty { key: "nope".into() }),
        UpdateError::NotFound { .. }
    ));
    assert!(matches!(
        refused(set("", "v")),
        UpdateError::InvalidName { .. }
    ));
    assert!(matches!(
        refused(set("bad\nkey", "v")),
        UpdateError::InvalidName { .. }
    ));
    assert!(matches!(
        refused(set("k", &"x".repeat(MAX_VALUE_LEN + 1))),
        UpdateError::ValueTooLong { .. }
    ));
    // A group in another group's resource list cannot be moved away from its dependents.
    let mut t = s.clone();
    t.apply(4, &Update::AddGroup(group("db")))
        .expect("new group");
    let e = t
        .apply(4, &Update::SetResource(resource("ip", "db", &[])))
        .expect_err("ip is needed in web");
    assert!(matches!(e, UpdateError::InUse { .. }), "{e}");

    // Removal in the right order works.
    let mut t = s.clone();
    for u in [
        Update::RemoveResource {
            name: "httpd".into(),
        },
        Update::RemoveResource { name: "ip".into() },
        Update::RemoveGroup { name: "web".into() },
        Update::RemoveNode { node: "n1".into() },
        Update::DeleteProperty {
            key: "cluster.name".into(),
        },
    ] {
        t.apply(5, &u).expect("valid removal");
    }
    assert_eq!(t.content, DbContent::default());
    assert_eq!(t.seq, 11);
}

#[test]
fn size_limits_are_errors_not_panics() {
    let s = DbSnapshot::default();
    let e = s
        .check_next(&set("k", &"x".repeat(MAX_UPDATE_BYTES)))
        .expect_err("too large");
    assert!(matches!(e, UpdateError::TooLarge { .. }), "{e}");
    // Fill the database close to its limit, then one more value does not fit.
    let mut s = DbSnapshot::default();
    let value = "v".repeat(MAX_VALUE_LEN);
    let mut i = 0;
    loop {
        let u = set(&format!("k{i}"), &value);
        match s.check_next(&u) {
            Ok(()) => s.apply(1, &u).expect("checked"),
            Err(UpdateError::TooLarge { what, size, max }) => {
                assert_eq!(max, MAX_SNAPSHOT_BYTES);
                assert!(size > max, "{what}");
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
        i += 1;
        assert!(i < 1000, "never refused");
    }
    // The largest database and the largest update fit on the disk.
    let record = DiskRecord {
        committed: s.clone(),
        pending: Some(Pending {
            seq: s.seq + 1,
            epoch: 1,
            origin: 1,
            update: set("big", &"y".repeat(MAX_VALUE_LEN)),
        }),
        written: 1,
    };
    encode_disk_copy(7, DiskCopy::A, &record).expect("fits on the disk");
}

#[test]
fn snapshots_encode_and_checksum_deterministically() {
    let s = populated();
    let bytes = s.encode().expect("encodes");
    let back = DbSnapshot::decode(&bytes).expect("decodes");
    assert_eq!(back, s);
    assert_eq!(back.checksum(), s.checksum());
    let mut other = s.clone();
    other.epoch = 99;
    assert_eq!(other.checksum(), s.checksum(), "the epoch is not history");
    other.apply(99, &set("x", "y")).expect("valid");
    assert_ne!(other.checksum(), s.checksum());
    assert!(DbSnapshot::decode(b"\xc1garbage").is_err());
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("ftkit-db-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_store_applies_atomically_and_survives_reopen() {
    let dir = TempDir::new("store");
    let path = dir.0.join("cluster.redb");
    let want = populated();
    {
        let mut db = ClusterDb::open(&path).expect("created");
        assert_eq!(db.snapshot().expect("read"), DbSnapshot::default());
        let mut replay = DbSnapshot::default();
        let updates = [
            set("cluster.name", "lab"),
            Update::AddNode { node: "n1".into() },
            Update::SetNodeProperty {
                node: "n1".into(),
                key: "rack".into(),
                value: "r1".into(),
            },
            Update::AddGroup(group("web")),
            Update::AddResource(resource("ip", "web", &[])),
            Update::AddResource(resource("httpd", "web", &["ip"])),
        ];
        for (i, u) in updates.iter().enumerate() {
            let seq = u64::try_from(i).expect("small") + 1;
            replay.apply(3, u).expect("valid");
            let got = db.apply(seq, 3, u).expect("applied");
            assert_eq!(got, replay);
        }
        // Out of order, or invalid here: refused, nothing written.
        let e = db.apply(9, 3, &set("a", "b")).expect_err("gap");
        assert!(
            matches!(
                e,
                DbError::OutOfOrder {
                    got: 9,
                    have: 6,
                    ..
                }
            ),
            "{e}"
        );
        let e = db
            .apply(7, 3, &Update::RemoveGroup { name: "web".into() })
            .expect_err("in use");
        assert!(matches!(e, DbError::Diverged { seq: 7, .. }), "{e}");
        assert_eq!(db.snapshot().expect("read"), want);
        // A pending update survives until an apply makes it obsolete.
        let pending = Pending {
            seq: 7,
            epoch: 4,
            origin: 4,
            update: set("a", "b"),
        };
        db.save_gum(&GumPersisted {
            pending: Some(pending.clone()),
        })
        .expect("saved");
    }
    let mut db = ClusterDb::open(&path).expect("reopened");
    assert_eq!(db.snapshot().expect("read"), want);
    assert_eq!(
        db.gum_persisted()
            .expect("read")
            .pending
            .as_ref()
            .map(|p| p.seq),
        Some(7)
    );
    db.apply(7, 4, &set("a", "b")).expect("applied");
    assert_eq!(db.gum_persisted().expect("read"), GumPersisted::default());

    // A state transfer replaces everything, removals included.
    let mut other = DbSnapshot::default();
    other.apply(8, &set("only", "this")).expect("valid");
    other.seq = 42;
    db.install(&other).expect("installed");
    drop(db);
    let db = ClusterDb::open(&path).expect("reopened");
    assert_eq!(db.snapshot().expect("read"), other);
}

#[test]
fn an_aborted_transaction_leaves_no_trace() {
    // What apply relies on: redb makes a transaction all or nothing across a reopen.
    let dir = TempDir::new("abort");
    let path = dir.0.join("cluster.redb");
    let before = {
        let mut db = ClusterDb::open(&path).expect("created");
        db.apply(1, 1, &set("a", "1")).expect("applied");
        let before = db.snapshot().expect("read");
        let txn = db.db.begin_write().expect("txn");
        {
            let mut props = txn.open_table(PROPERTIES).expect("table");
            props.insert("a", "torn").expect("insert");
            let mut meta = txn.open_table(META).expect("table");
            meta.insert(KEY_SEQ, 2u64.to_le_bytes().as_slice())
                .expect("insert");
        }
        txn.abort().expect("aborted");
        before
    };
    let db = ClusterDb::open(&path).expect("reopened");
    assert_eq!(db.snapshot().expect("read"), before);
}

#[test]
fn corrupt_and_foreign_files_are_clear_errors() {
    let dir = TempDir::new("corrupt");
    // Garbage.
    let garbage = dir.0.join("garbage.redb");
    std::fs::write(&garbage, vec![0x5a; 64 * 1024]).expect("write");
    let e = ClusterDb::open(&garbage).expect_err("garbage");
    assert!(e.to_string().contains("garbage.redb"), "{e}");
    // A valid database whose pages were altered behind redb's back.
    let altered = dir.0.join("altered.redb");
    {
        let mut db = ClusterDb::open(&altered).expect("created");
        for i in 0..50u64 {
            db.apply(i + 1, 1, &set(&format!("key{i}"), &"v".repeat(500)))
                .expect("applied");
        }
    }
    let mut bytes = std::fs::read(&altered).expect("read");
    let len = bytes.len();
    for b in bytes.iter_mut().skip(len / 3).take(len / 3) {
        *b ^= 0xa5;
    }
    std::fs::write(&altered, &bytes).expect("write");
    match ClusterDb::open(&altered) {
        Err(e) => assert!(e.to_string().contains("altered.redb"), "{e}"),
        Ok(db) => {
            // If the damage missed every live page, the content must still be intact.
            let s = db.snapshot().expect("intact");
            assert_eq!(s.seq, 50);
        }
    }
    // A redb file of something else.
    let foreign = dir.0.join("registry.redb");
    {
        let db = Database::create(&foreign).expect("created");
        let txn = db.begin_write().expect("txn");
        {
            let def: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
            let mut t = txn.open_table(def).expect("table");
            t.insert("x", b"y".as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let e = ClusterDb::open(&foreign).expect_err("foreign");
    assert!(e.to_string().contains("not a cluster database"), "{e}");
    // A garbled record inside a valid database.
    let garbled = dir.0.join("garbled.redb");
    {
        let db = ClusterDb::open(&garbled).expect("created");
        let txn = db.db.begin_write().expect("txn");
        {
            let mut t = txn.open_table(GROUPS).expect("table");
            t.insert("g", b"\xc1\xc1".as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let e = ClusterDb::open(&garbled).expect_err("garbled");
    assert!(e.to_string().contains("group \"g\""), "{e}");
}

fn record(seq: u64, written: u64) -> DiskRecord {
    let mut committed = DbSnapshot::default();
    for i in 0..seq {
        committed
            .apply(written, &set(&format!("k{i}"), "v"))
            .expect("valid");
    }
    DiskRecord {
        committed,
        pending: None,
        written,
    }
}

const HASH: u64 = 0x1234_5678;

#[test]
fn the_disk_area_alternates_copies_and_keeps_the_newest() {
    let mut disk = MemDisk::new(DB_AREA_END);
    let empty = read_disk_area(&mut disk, HASH).expect("read");
    assert_eq!(empty, DiskArea::default());
    let r1 = record(1, 1);
    write_disk_area(&mut disk, HASH, &r1).expect("written");
    let a = read_disk_area(&mut disk, HASH).expect("read");
    assert_eq!((a.record.as_ref(), a.copy), (Some(&r1), Some(DiskCopy::A)));
    let mut r2 = record(1, 2);
    r2.pending = Some(Pending {
        seq: 2,
        epoch: 2,
        origin: 2,
        update: set("p", "q"),
    });
    write_disk_area(&mut disk, HASH, &r2).expect("written");
    let a = read_disk_area(&mut disk, HASH).expect("read");
    assert_eq!((a.record.as_ref(), a.copy), (Some(&r2), Some(DiskCopy::B)));
    let r3 = record(2, 2);
    write_disk_area(&mut disk, HASH, &r3).expect("written");
    let a = read_disk_area(&mut disk, HASH).expect("read");
    assert_eq!((a.record.as_ref(), a.copy), (Some(&r3), Some(DiskCopy::A)));
    // Another cluster sees nothing it trusts.
    let other = read_disk_area(&mut disk, HASH + 1).expect("read");
    assert_eq!(other.record, None);
    assert_eq!(other.unreadable.len(), 2);
}

#[test]
fn torn_and_corrupt_copies_read_as_absent() {
    let mut disk = MemDisk::new(DB_AREA_END);
    let old = record(3, 1);
    write_disk_area(&mut disk, HASH, &old).expect("written"); // copy A
    let new = record(4, 2);
    // A write torn after its payload: B's payload is new, its header never landed.
    let sectors = encode_disk_copy(HASH, DiskCopy::B, &new).expect("encodes");
    for (i, s) in sectors.iter().enumerate().skip(1) {
        disk.put(DiskCopy::B.first_sector() + i as u64, s);
    }
    let a = read_disk_area(&mut disk, HASH).expect("read");
    assert_eq!(a.record.as_ref(), Some(&old));
    // The header lands torn (half of it).
    let mut torn = disk.sector(DiskCopy::B.first_sector());
    torn[..SECTOR_SIZE / 2].copy_from_slice(&sectors[0][..SECTOR_SIZE / 2]);
    disk.put(DiskCopy::B.first_sector(), &torn);
    let a = read_disk_area(&mut disk, HASH).expect("read");
    assert_eq!(a.record.as_ref(), Some(&old));
    assert_eq!(a.unreadable.len(), 1);
    // The whole new copy lands: it wins.
    disk.put(DiskCopy::B.first_sector(), &sectors[0]);
    let a = read_disk_area(&mut disk, HASH).expect("read");
    assert_eq!(a.record.as_ref(), Some(&new));
    // A flipped bit in the newest payload: the older copy is used.
    disk.flip_bit(DiskCopy::B.first_sector() + 1, 77);
    let a = read_disk_area(&mut disk, HASH).expect("read");
    assert_eq!(a.record.as_ref(), Some(&old));
    assert!(a.unreadable.iter().any(|(c, _)| *c == DiskCopy::B));
    // The next write goes over the broken copy, never over the good one.
    let newer = record(5, 3);
    write_disk_area(&mut disk, HASH, &newer).expect("written");
    let a = read_disk_area(&mut disk, HASH).expect("read");
    assert_eq!(
        (a.record.as_ref(), a.copy),
        (Some(&newer), Some(DiskCopy::B))
    );
    // Both copies garbled: absent, with both reported, and no panic.
    disk.flip_bit(DiskCopy::A.first_sector(), 3);
    disk.flip_bit(DiskCopy::B.first_sector(), 3);
    let a = read_disk_area(&mut disk, HASH).expect("read");
    assert_eq!(a.record, None);
    assert_eq!(a.unreadable.len(), 2);
    // Random garbage headers with a valid checksum but absurd lengths are refused.
    let mut h = sectors[0];
    h[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
    let crc = crc32c::crc32c(&h[..HEADER_CRC_OFFSET]);
    h[HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        decode_disk_header(HASH, DiskCopy::B, &h),
        HeaderState::Unknown(_)
    ));
    assert!(matches!(
        decode_disk_header(HASH, DiskCopy::A, &sectors[0]),
        HeaderState::Unknown(_)
    ));
}

#[test]
fn disk_io_errors_are_errors() {
    struct Broken;
    impl Disk for Broken {
        fn read_sectors(&mut self, _: u64, _: u64) -> io::Result<Vec<[u8; SECTOR_SIZE]>> {
            Err(io::Error::other("EIO"))
        }
        fn write_sector(&mut self, _: u64, _: &[u8; SECTOR_SIZE]) -> io::Result<()> {
            Err(io::Error::other("EIO"))
        }
    }
    assert!(matches!(
        read_disk_area(&mut Broken, HASH),
        Err(DbError::DiskIo(_))
    ));
    assert!(matches!(
        write_disk_area(&mut Broken, HASH, &record(1, 1)),
        Err(DbError::DiskIo(_))
    ));
    // A disk too small for the area fails cleanly.
    let mut small = MemDisk::new(DB_AREA_FIRST_SECTOR + 1);
    assert!(write_disk_area(&mut small, HASH, &record(1, 1)).is_err());
}

/// The shapes of the database before groups carried a policy and ownership.
mod old {
    use std::collections::BTreeMap;

    use serde::Serialize;

    #[derive(Serialize)]
    pub struct Group {
        pub name: String,
        pub preferred_owners: Vec<String>,
        pub properties: BTreeMap<String, String>,
    }

    #[derive(Serialize)]
    pub struct Resource {
        pub name: String,
        pub group: String,
        pub kind: String,
        pub depends_on: Vec<String>,
        pub properties: BTreeMap<String, String>,
    }

    #[derive(Serialize)]
    pub struct DbContent {
        pub nodes: BTreeMap<String, BTreeMap<String, String>>,
        pub properties: BTreeMap<String, String>,
        pub groups: BTreeMap<String, Group>,
        pub resources: BTreeMap<String, Resource>,
    }

    #[derive(Serialize)]
    pub struct DbSnapshot {
        pub seq: u64,
        pub epoch: u64,
        pub content: DbContent,
    }

    #[derive(Serialize)]
    #[serde(rename_all = "snake_case", tag = "op")]
    pub enum Update {
        AddGroup(Group),
    }

    pub fn content() -> DbContent {
        DbContent {
            nodes: [("n1".to_string(), BTreeMap::new())].into(),
            properties: [("cluster.name".to_string(), "lab".to_string())].into(),
            groups: [(
                "web".to_string(),
                Group {
                    name: "web".into(),
                    preferred_owners: vec!["n1".into(), "n2".into()],
                    properties: [("note".to_string(), "old".to_string())].into(),
                },
            )]
            .into(),
            resources: [(
                "httpd".to_string(),
                Resource {
                    name: "httpd".into(),
                    group: "web".into(),
                    kind: "exec".into(),
                    depends_on: vec![],
                    properties: [("agent".to_string(), "/usr/lib/ocf/httpd".to_string())].into(),
                },
            )]
            .into(),
        }
    }
}

/// What [`old::content`] reads as today: the defaults fill the new fields.
fn old_content_today() -> DbContent {
    DbContent {
        nodes: [("n1".to_string(), BTreeMap::new())].into(),
        properties: [("cluster.name".to_string(), "lab".to_string())].into(),
        groups: [(
            "web".to_string(),
            Group {
                name: "web".into(),
                preferred_owners: vec!["n1".into(), "n2".into()],
                properties: [("note".to_string(), "old".to_string())].into(),
                ..Group::default()
            },
        )]
        .into(),
        resources: [(
            "httpd".to_string(),
            Resource {
                name: "httpd".into(),
                group: "web".into(),
                kind: "exec".into(),
                properties: [("agent".to_string(), "/usr/lib/ocf/httpd".to_string())].into(),
                ..Resource::default()
            },
        )]
        .into(),
        ownership: BTreeMap::new(),
    }
}

#[test]
fn databases_of_the_previous_format_still_load() {
    let want = old_content_today();
    let g = &want.groups["web"];
    assert_eq!(
        (g.any_owner, g.failover_threshold, g.failover_period_ms),
        (false, 3, 3_600_000)
    );
    assert_eq!((g.failback, g.desired), (Failback::Never, Desired::Online));
    // Compact (what the store, the disk and state transfers use) and named encodings.
    let snap = old::DbSnapshot {
        seq: 9,
        epoch: 2,
        content: old::content(),
    };
    let bytes = rmp_serde::to_vec(&snap).expect("encodes");
    let back = DbSnapshot::decode(&bytes).expect("an old snapshot decodes");
    assert_eq!((back.seq, back.epoch), (9, 2));
    assert_eq!(back.content, want);
    let named = rmp_serde::to_vec_named(&old::content()).expect("encodes");
    let back: DbContent = rmp_serde::from_slice(&named).expect("an old named content decodes");
    assert_eq!(back, want);
    // A pending update of the old shape (persisted beside the database) decodes too.
    let u = old::Update::AddGroup(old::content().groups.remove("web").expect("web"));
    let bytes = rmp_serde::to_vec(&u).expect("encodes");
    let back: Update = rmp_serde::from_slice(&bytes).expect("an old update decodes");
    assert_eq!(back, Update::AddGroup(want.groups["web"].clone()));
    // An old group without its ownership record is offline at epoch 0, and moves on from there.
    let mut c = want.clone();
    assert_eq!(c.ownership_of("web"), Ownership::default());
    c.apply(&Update::AssignGroup {
        group: "web".into(),
        epoch: 1,
        owner: Some("n1".into()),
        at_ms: 5,
        reason: "placed".into(),
        failover: false,
    })
    .expect("the first assignment of an old group");
    assert_eq!(c.ownership_of("web").state, GroupState::Onlining);
}

#[test]
fn a_store_of_the_previous_format_opens_and_gains_ownership() {
    let dir = TempDir::new("oldstore");
    let path = dir.0.join("cluster.redb");
    {
        // The previous layout: five tables, no ownership.
        let db = Database::create(&path).expect("created");
        let txn = db.begin_write().expect("txn");
        {
            let mut meta = txn.open_table(META).expect("table");
            meta.insert(KEY_FORMAT, STORE_FORMAT.to_le_bytes().as_slice())
                .expect("insert");
            meta.insert(KEY_SEQ, 4u64.to_le_bytes().as_slice())
                .expect("insert");
            let old = old::content();
            let mut props = txn.open_table(PROPERTIES).expect("table");
            props.insert("cluster.name", "lab").expect("insert");
            let mut nodes = txn.open_table(NODES).expect("table");
            let empty: BTreeMap<String, String> = BTreeMap::new();
            let v = rmp_serde::to_vec(&empty).expect("encodes");
            nodes.insert("n1", v.as_slice()).expect("insert");
            let mut groups = txn.open_table(GROUPS).expect("table");
            let v = rmp_serde::to_vec(&old.groups["web"]).expect("encodes");
            groups.insert("web", v.as_slice()).expect("insert");
            let mut resources = txn.open_table(RESOURCES).expect("table");
            let v = rmp_serde::to_vec(&old.resources["httpd"]).expect("encodes");
            resources.insert("httpd", v.as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let mut db = ClusterDb::open(&path).expect("an old store opens");
    let s = db.snapshot().expect("read");
    assert_eq!(s.seq, 4);
    assert_eq!(s.content, old_content_today());
    let placed = Update::AssignGroup {
        group: "web".into(),
        epoch: 1,
        owner: Some("n2".into()),
        at_ms: 7,
        reason: "placed on n2".into(),
        failover: false,
    };
    let after = db.apply(5, 1, &placed).expect("applied");
    drop(db);
    let db = ClusterDb::open(&path).expect("reopened");
    let s = db.snapshot().expect("read");
    assert_eq!(s, after);
    assert_eq!(s.content.ownership["web"].owner.as_deref(), Some("n2"));
}

fn assign(group: &str, epoch: u64, owner: Option<&str>, at_ms: u64, failover: bool) -> Update {
    Update::AssignGroup {
        group: group.into(),
        epoch,
        owner: owner.map(Into::into),
        at_ms,
        reason: "test".into(),
        failover,
    }
}

fn report(group: &str, epoch: u64, state: GroupState) -> Update {
    Update::ReportGroup {
        group: group.into(),
        epoch,
        state,
    }
}

#[test]
fn ownership_changes_by_compare_and_set_and_sensible_transitions() {
    let mut c = populated().content;
    let own = |c: &DbContent| c.ownership_of("web");
    assert_eq!(
        own(&c),
        Ownership::default(),
        "AddGroup starts offline at 0"
    );
    let refused = |c: &DbContent, u: Update| -> UpdateError {
        let mut t = c.clone();
        let e = t.apply(&u).expect_err("refused");
        assert_eq!(&t, c, "a refused update changed the database");
        e
    };
    // The epoch must be the next one; the owner a known node.
    for bad in [0, 2] {
        let e = refused(&c, assign("web", bad, Some("n1"), 1, false));
        assert!(
            matches!(e, UpdateError::StaleEpoch { expected: 1, got, .. } if got == bad),
            "{e}"
        );
    }
    let e = refused(&c, assign("web", 1, Some("n9"), 1, false));
    assert!(matches!(e, UpdateError::NotFound { .. }), "{e}");
    let e = refused(&c, assign("nope", 1, Some("n1"), 1, false));
    assert!(matches!(e, UpdateError::NotFound { .. }), "{e}");
    let e = refused(
        &c,
        Update::AssignGroup {
            group: "web".into(),
            epoch: 1,
            owner: Some("n1".into()),
            at_ms: 0,
            reason: "r".repeat(MAX_REASON_LEN + 1),
            failover: false,
        },
    );
    assert!(matches!(e, UpdateError::ValueTooLong { .. }), "{e}");
    // An offline group reports nothing; it is assigned first.
    let e = refused(&c, report("web", 0, GroupState::Online));
    assert!(matches!(e, UpdateError::BadState { .. }), "{e}");
    // n2 is a preferred owner, though not a node of the database: a possible owner.
    c.apply(&assign("web", 1, Some("n2"), 100, false))
        .expect("placed");
    assert_eq!(
        own(&c),
        Ownership {
            owner: Some("n2".into()),
            epoch: 1,
            state: GroupState::Onlining,
            moving_to: None,
            failovers: vec![],
            reason: "test".into(),
        }
    );
    let e = refused(&c, report("web", 0, GroupState::Online));
    assert!(matches!(e, UpdateError::StaleEpoch { .. }), "{e}");
    for bad in [
        GroupState::Offline,
        GroupState::Onlining,
        GroupState::Offlining,
    ] {
        let e = refused(&c, report("web", 1, bad));
        assert!(e.to_string().contains("cannot report"), "{e}");
    }
    c.apply(&report("web", 1, GroupState::Online))
        .expect("online");
    // An online group cannot be removed; releasing it needs the current epoch and another node.
    let e = refused(&c, Update::RemoveGroup { name: "web".into() });
    assert!(matches!(e, UpdateError::InUse { .. }), "{e}");
    let release = |epoch: u64, to: Option<&str>| Update::ReleaseGroup {
        group: "web".into(),
        epoch,
        to: to.map(Into::into),
        reason: "move".into(),
    };
    assert!(matches!(
        refused(&c, release(2, Some("n1"))),
        UpdateError::StaleEpoch { .. }
    ));
    assert!(matches!(
        refused(&c, release(1, Some("n2"))),
        UpdateError::BadState { .. }
    ));
    assert!(matches!(
        refused(&c, release(1, Some("n7"))),
        UpdateError::NotFound { .. }
    ));
    // A node that runs a group cannot be removed.
    let mut t = c.clone();
    t.apply(&Update::AddNode { node: "n3".into() })
        .expect("node");
    t.apply(&Update::AddGroup(Group {
        name: "other".into(),
        ..Group::default()
    }))
    .expect("group");
    t.apply(&assign("other", 1, Some("n3"), 1, false))
        .expect("any known node may own it");
    let e = t
        .apply(&Update::RemoveNode { node: "n3".into() })
        .expect_err("it runs other");
    assert!(e.to_string().contains("ownership"), "{e}");
    let e = t
        .apply(&Update::RemoveGroup {
            name: "other".into(),
        })
        .expect_err("onlining");
    assert!(
        matches!(
            e,
            UpdateError::BadState {
                state: GroupState::Onlining,
                ..
            }
        ),
        "{e}"
    );

    c.apply(&release(1, Some("n1"))).expect("released");
    assert_eq!(
        (own(&c).state, own(&c).moving_to.as_deref()),
        (GroupState::Offlining, Some("n1"))
    );
    assert!(matches!(
        refused(&c, release(1, None)),
        UpdateError::BadState { .. }
    ));
    c.apply(&report("web", 1, GroupState::Offline))
        .expect("offline");
    // A failover is recorded at its time and pruned to the period on the next assignment.
    c.apply(&assign("web", 2, Some("n1"), 1_000, true))
        .expect("failover");
    assert_eq!(own(&c).failovers, [1_000]);
    assert_eq!(own(&c).moving_to, None);
    c.apply(&report("web", 2, GroupState::Failed))
        .expect("failed locally");
    let period = DEFAULT_FAILOVER_PERIOD_MS;
    c.apply(&assign("web", 3, Some("n2"), 1_000 + period, true))
        .expect("failover after the period");
    assert_eq!(own(&c).failovers, [1_000 + period]);
    assert_eq!(own(&c).failovers_within(period, 1_000 + period), 1);
    assert_eq!(own(&c).failovers_within(period, 1_000 + 2 * period), 0);
    // Giving up: no owner, failed, and it may be removed; an operator's retry resets it.
    c.apply(&assign("web", 4, None, 2_000 + period, true))
        .expect("give up");
    assert_eq!((own(&c).owner, own(&c).state), (None, GroupState::Failed));
    assert_eq!(own(&c).failovers.len(), 2);
    let mut t = c.clone();
    t.apply(&Update::SetGroupDesired {
        group: "web".into(),
        desired: Desired::Online,
    })
    .expect("retry");
    assert_eq!(
        (
            t.ownership_of("web").state,
            t.ownership_of("web").failovers.len()
        ),
        (GroupState::Offline, 0)
    );
    // Removing the group leaves an owner-less record that keeps its epoch ...
    for u in [
        Update::RemoveResource {
            name: "httpd".into(),
        },
        Update::RemoveResource { name: "ip".into() },
        Update::RemoveGroup { name: "web".into() },
    ] {
        c.apply(&u).expect("removal");
    }
    assert_eq!(
        (own(&c).owner, own(&c).state, own(&c).epoch),
        (None, GroupState::Offline, 4)
    );
    assert!(matches!(
        refused(
            &c,
            Update::SetGroupDesired {
                group: "web".into(),
                desired: Desired::Offline
            }
        ),
        UpdateError::NotFound { .. }
    ));
    // ... so the group added again goes on from it: its replicas would refuse epoch 1.
    c.apply(&Update::AddGroup(group("web")))
        .expect("added again");
    assert_eq!((own(&c).owner, own(&c).epoch), (None, 4));
    assert!(matches!(
        refused(&c, assign("web", 1, Some("n1"), 3_000 + period, false)),
        UpdateError::StaleEpoch { .. }
    ));
    c.apply(&assign("web", 5, Some("n1"), 3_000 + period, false))
        .expect("the next epoch");
}

#[test]
fn the_failover_history_is_bounded_by_the_threshold() {
    let mut c = DbContent::default();
    c.apply(&Update::AddGroup(Group {
        name: "g".into(),
        preferred_owners: vec!["a".into()],
        failover_threshold: 2,
        ..Group::default()
    }))
    .expect("group");
    for i in 1..=10u64 {
        c.apply(&assign("g", i, Some("a"), i, true))
            .expect("assign");
    }
    assert_eq!(c.ownership_of("g").failovers, [8, 9, 10]);
}

#[test]
fn group_policies_and_resource_kinds_are_validated() {
    let s = populated();
    let refused = |u: Update| -> UpdateError {
        let mut t = s.clone();
        let e = t.apply(4, &u).expect_err("refused");
        assert_eq!(t, s, "a refused update changed the database");
        e
    };
    let with = |f: fn(&mut Group)| {
        let mut g = group("g2");
        f(&mut g);
        Update::AddGroup(g)
    };
    for (u, needle) in [
        (with(|g| g.failover_period_ms = 0), "failover period"),
        (
            with(|g| g.failover_period_ms = MAX_FAILOVER_PERIOD_MS + 1),
            "failover period",
        ),
        (
            with(|g| g.failover_threshold = MAX_FAILOVER_THRESHOLD + 1),
            "threshold",
        ),
        (
            with(|g| {
                g.failback = Failback::Window {
                    start_min: 1440,
                    end_min: 10,
                }
            }),
            "minutes of the day",
        ),
        (
            with(|g| {
                g.failback = Failback::Window {
                    start_min: 60,
                    end_min: 60,
                }
            }),
            "empty",
        ),
    ] {
        let e = refused(u);
        assert!(
            matches!(e, UpdateError::BadPolicy { .. }) && e.to_string().contains(needle),
            "{e}"
        );
    }
    let mut ok = s.clone();
    ok.apply(
        4,
        &with(|g| {
            g.failback = Failback::Window {
                start_min: 22 * 60,
                end_min: 6 * 60,
            };
            g.any_owner = true;
            g.failover_threshold = 0;
        }),
    )
    .expect("a window wrapping midnight is fine");

    let kind = |kind: &str, props: &[(&str, &str)]| {
        Update::AddResource(Resource {
            name: "r".into(),
            group: "web".into(),
            kind: kind.into(),
            properties: props
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            ..Resource::default()
        })
    };
    let e = refused(kind("teleporter", &[]));
    assert!(matches!(e, UpdateError::UnknownKind { .. }), "{e}");
    assert!(e.to_string().contains("unknown type \"teleporter\""), "{e}");
    for k in ResourceKind::ALL {
        assert!(e.to_string().contains(k.name()), "{e} does not list {k}");
        assert_eq!(ResourceKind::from_name(k.name()), Some(k));
    }
    for (u, needle) in [
        (kind("service", &[]), "needs property \"service\""),
        (kind("checkpoint", &[]), "needs property \"service\""),
        (
            kind("checkpoint", &[("service", "kv")]),
            "needs property \"fileset\"",
        ),
        (kind("fileset", &[]), "needs property \"fileset\""),
        (kind("fileset", &[("fileset", "")]), "fileset"),
        (kind("exec", &[]), "needs property \"agent\""),
        (kind("exec", &[("agent", "bin/agent")]), "absolute path"),
        (
            kind("ip", &[("interface", "eth0")]),
            "needs property \"address\"",
        ),
        (
            kind("ip", &[("address", "10.0.0.5/24")]),
            "needs property \"interface\"",
        ),
        (
            kind("ip", &[("address", "10.0.0.5"), ("interface", "eth0")]),
            "ADDRESS/PREFIX",
        ),
        (
            kind("ip", &[("address", "10.0.0.500/24"), ("interface", "eth0")]),
            "not an IP",
        ),
        (
            kind("ip", &[("address", "10.0.0.5/33"), ("interface", "eth0")]),
            "prefix",
        ),
        (
            kind("ip", &[("address", "fd00::5/129"), ("interface", "eth0")]),
            "prefix",
        ),
        (
            kind("ip", &[("address", "10.0.0.5/24"), ("interface", "eth0/x")]),
            "interface",
        ),
        (
            kind(
                "ip",
                &[
                    ("address", "10.0.0.5/24"),
                    ("interface", "a-very-long-ifname"),
                ],
            ),
            "interface",
        ),
    ] {
        let e = refused(u);
        assert!(
            matches!(e, UpdateError::BadResource { .. }) && e.to_string().contains(needle),
            "{needle}: {e}"
        );
    }
    for u in [
        kind("service", &[("service", "kv")]),
        kind("checkpoint", &[("service", "kv"), ("fileset", "kv-ckpt")]),
        kind("fileset", &[("fileset", "data")]),
        kind(
            "exec",
            &[("agent", "/usr/lib/ocf/resource.d/x"), ("args", "--y")],
        ),
        kind("ip", &[("address", "10.0.0.5/24"), ("interface", "eth0")]),
        kind("ip", &[("address", "fd00::5/64"), ("interface", "veth-a")]),
    ] {
        let mut t = s.clone();
        t.apply(4, &u).expect("valid resource");
        assert_eq!(
            t.content.resources["r"]
                .resource_kind()
                .map(ResourceKind::name),
            Some(t.content.resources["r"].kind.as_str())
        );
    }
    // Timeouts and intervals are positive and bounded.
    for f in [
        |r: &mut Resource| r.online_timeout_ms = 0,
        |r: &mut Resource| r.offline_timeout_ms = 0,
        |r: &mut Resource| r.looks_alive_ms = 0,
        |r: &mut Resource| r.is_alive_ms = MAX_RESOURCE_TIMEOUT_MS + 1,
    ] {
        let mut r = resource("r", "web", &[]);
        f(&mut r);
        let e = refused(Update::AddResource(r));
        assert!(matches!(e, UpdateError::BadResource { .. }), "{e}");
    }
    // The existing checks still hold for typed resources.
    let e = refused(Update::SetResource(resource("ip", "web", &["httpd"])));
    assert!(e.to_string().contains("cycle"), "{e}");
}

#[test]
fn a_batch_applies_all_its_updates_under_one_sequence_number_or_none() {
    let mut s = populated();
    s.apply(3, &Update::AddGroup(group("db"))).expect("valid");
    let seq = s.seq;
    // Two assignments and a property in one batch: one sequence number, all applied in order.
    let batch = Update::Batch {
        updates: vec![
            assign("web", 1, Some("n1"), 10, false),
            assign("db", 1, Some("n1"), 10, false),
            report("web", 1, GroupState::Online),
            set("ftkit.note", "batched"),
        ],
    };
    let checked = s.clone();
    checked
        .check_next(&batch)
        .expect("a valid batch passes the sequencer's check");
    s.apply(4, &batch).expect("valid batch");
    assert_eq!(s.seq, seq + 1);
    assert_eq!(s.epoch, 4);
    assert_eq!(s.content.ownership_of("web").state, GroupState::Online);
    assert_eq!(s.content.ownership_of("db").epoch, 1);
    assert_eq!(s.content.properties["ftkit.note"], "batched");

    // One refused update refuses the batch: nothing changes, and the error names it.
    let before = s.clone();
    let bad = Update::Batch {
        updates: vec![
            assign("db", 2, Some("n1"), 20, false),
            assign("web", 7, Some("n1"), 20, false),
        ],
    };
    let e = s.apply(5, &bad).expect_err("stale epoch inside");
    assert!(
        matches!(&e, UpdateError::InBatch { index: 1, source } if matches!(**source, UpdateError::StaleEpoch { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("update 1 of the batch"), "{e}");
    assert_eq!(s, before, "a refused batch changed the database");
    assert!(s.check_next(&bad).is_err());

    // Empty and nested batches are refused.
    for bad in [
        Update::Batch {
            updates: Vec::new(),
        },
        Update::Batch {
            updates: vec![Update::Batch {
                updates: vec![set("k", "v")],
            }],
        },
    ] {
        let e = s.apply(5, &bad).expect_err("refused");
        assert!(matches!(e, UpdateError::BadBatch { .. }), "{e}");
        assert_eq!(s, before);
    }

    // The store applies a batch in one transaction, like any update.
    let dir = TempDir::new("batch");
    let mut db = ClusterDb::open(&dir.0.join("cluster.redb")).expect("created");
    db.install(&before).expect("installed");
    let next = Update::Batch {
        updates: vec![
            report("db", 1, GroupState::Online),
            set("ftkit.note", "stored"),
        ],
    };
    let got = db.apply(before.seq + 1, 5, &next).expect("applied");
    assert_eq!(got.content.ownership_of("db").state, GroupState::Online);
    let reopened = db.snapshot().expect("read");
    assert_eq!(reopened, got);
    assert!(
        db.apply(before.seq + 2, 5, &bad).is_err(),
        "a refused batch is an error of the store too"
    );
    assert_eq!(db.snapshot().expect("read"), got, "and writes nothing");
}

#[test]
fn updates_are_cut_into_runs_that_fit_a_batch() {
    assert_eq!(Update::batch(Vec::new()), None);
    assert_eq!(Update::batch(vec![set("k", "v")]), Some(set("k", "v")));
    // 40 properties of 4 KiB: about 160 KiB, more than one batch holds.
    let big: Vec<Update> = (0..40)
        .map(|i| set(&format!("p{i}"), &"x".repeat(4096)))
        .collect();
    let runs = Update::runs_for_batches(big.clone());
    assert!(runs.len() >= 3, "{} runs", runs.len());
    assert_eq!(runs.concat(), big, "order and content kept");
    let mut s = DbSnapshot::default();
    for run in runs {
        let u = Update::batch(run).expect("a run is never empty");
        assert!(u.encoded_len().expect("encodes") <= MAX_UPDATE_BYTES);
        s.check_next(&u).expect("each batch fits");
        s.apply(1, &u).expect("applies");
    }
    assert_eq!(s.content.properties.len(), 40);
    // An update too large for any batch forms a run of its own.
    let huge = set("huge", &"y".repeat(MAX_VALUE_LEN));
    let runs = Update::runs_for_batches(vec![set("a", "1"), huge.clone(), set("b", "2")]);
    assert_eq!(runs.len(), 3);
    assert_eq!(runs[1], [huge]);
}
