use super::*;
use crate::replay::testkit::Rng;

fn small() -> SegmentOptions {
    SegmentOptions { segment_bytes: 200 }
}

fn payload(seq: u64) -> Vec<u8> {
    format!("payload of record {seq}").into_bytes()
}

fn fill(log: &mut SegmentLog, seqs: std::ops::RangeInclusive<u64>) {
    for seq in seqs {
        log.append(seq, &payload(seq)).expect("append");
    }
}

fn read_all(log: &mut SegmentLog, from: u64) -> Vec<(u64, Vec<u8>)> {
    log.read_from(from)
        .expect("read_from")
        .collect::<Result<Vec<_>, _>>()
        .expect("records read back")
}

fn seg_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// Offsets of the records in a segment file, parsed independently of the code under test.
fn record_offsets(path: &Path) -> Vec<u64> {
    let bytes = fs::read(path).expect("read segment");
    let mut offsets = Vec::new();
    let mut pos = 0usize;
    while pos + RECORD_HEADER_BYTES <= bytes.len() {
        offsets.push(pos as u64);
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes"));
        pos += RECORD_HEADER_BYTES + len as usize;
    }
    offsets
}

fn raw_record(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_le_bytes());
    v.extend_from_slice(&record_crc(seq, payload).to_le_bytes());
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

#[test]
fn append_sync_reopen_and_read_back_across_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, rec) = SegmentLog::open(dir.path(), small()).expect("open");
    assert!(rec.is_clean());
    assert_eq!(
        (log.last_seq(), log.first_seq(), log.next_seq()),
        (0, None, None)
    );
    fill(&mut log, 1..=40);
    assert!(
        log.durable_seq() < 40,
        "rolled-over segments are synced, the last one is not"
    );
    assert!(log.segment_count() > 3, "small segments roll over");
    assert_eq!(log.sync().expect("sync"), 40);
    assert_eq!(read_all(&mut log, 1).len(), 40);
    let from_17 = read_all(&mut log, 17);
    assert_eq!(from_17.first().map(|r| r.0), Some(17));
    assert_eq!(
        from_17,
        (17..=40).map(|s| (s, payload(s))).collect::<Vec<_>>()
    );
    assert!(read_all(&mut log, 41).is_empty());
    assert!(read_all(&mut log, 1000).is_empty());
    let segments = log.segment_count();
    drop(log);

    let (mut log, rec) = SegmentLog::open(dir.path(), small()).expect("reopen");
    assert!(rec.is_clean(), "{rec:?}");
    assert_eq!(rec.records, 40);
    assert_eq!(rec.segments, segments);
    assert_eq!((rec.first_seq, rec.last_seq), (Some(1), 40));
    assert_eq!(log.durable_seq(), 40);
    assert_eq!(
        read_all(&mut log, 1),
        (1..=40).map(|s| (s, payload(s))).collect::<Vec<_>>()
    );
    // Every segment file is named after its first record.
    for path in seg_files(dir.path()) {
        let first = parse_segment_name(path.file_name().and_then(|n| n.to_str()).expect("name"))
            .expect("segment name");
        let bytes = fs::read(&path).expect("read");
        assert_eq!(
            u64::from_le_bytes(bytes[8..16].try_into().expect("8")),
            first
        );
    }
}

#[test]
fn duplicates_gaps_and_invalid_records_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _) = SegmentLog::open(dir.path(), small()).expect("open");
    assert!(matches!(log.append(0, b"x"), Err(LogError::InvalidSeq(0))));
    assert!(matches!(
        log.append(u64::MAX, b"x"),
        Err(LogError::InvalidSeq(_))
    ));
    // A log that never held anything accepts any first seq.
    log.append(100, b"a").expect("first seq is free");
    assert!(matches!(
        log.append(100, b"a"),
        Err(LogError::Duplicate {
            seq: 100,
            last: 100
        })
    ));
    assert!(matches!(
        log.append(7, b"a"),
        Err(LogError::Duplicate { seq: 7, last: 100 })
    ));
    assert!(matches!(
        log.append(102, b"a"),
        Err(LogError::Gap {
            seq: 102,
            expected: 101
        })
    ));
    let big = vec![0u8; MAX_RECORD_BYTES + 1];
    assert!(matches!(
        log.append(101, &big),
        Err(LogError::TooLarge { .. })
    ));
    log.append(101, b"b").expect("next seq");
    assert_eq!(
        read_all(&mut log, 100),
        vec![(100, b"a".to_vec()), (101, b"b".to_vec())]
    );
    assert!(matches!(
        log.read_from(99),
        Err(LogError::NotHeld {
            seq: 99,
            first: 100
        })
    ));
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_log, _) = SegmentLog::open(dir.path(), small()).expect("open");
    assert!(matches!(
        SegmentLog::open(dir.path(), small()),
        Err(LogError::Locked { .. })
    ));
}

#[test]
fn a_torn_tail_is_cut_off_and_the_log_continues() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _) = SegmentLog::open(dir.path(), SegmentOptions::default()).expect("open");
    fill(&mut log, 1..=10);
    log.sync().expect("sync");
    drop(log);
    let seg = seg_files(dir.path()).pop().expect("one segment");
    let offsets = record_offsets(&seg);
    let len = fs::metadata(&seg).expect("stat").len();
    // Cut the last record in the middle of its payload.
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .expect("open")
        .set_len(len - 3)
        .expect("cut");

    let (mut log, rec) = SegmentLog::open(dir.path(), SegmentOptions::default()).expect("reopen");
    let damage = rec.damage.clone().expect("damage reported");
    assert_eq!(damage.segment, seg);
    assert_eq!(damage.offset, offsets[9]);
    assert_eq!(damage.expected_seq, 10);
    assert!(damage.reason.is_torn(), "{:?}", damage.reason);
    assert!(matches!(damage.reason, Corruption::TornPayload { .. }));
    assert_eq!(damage.truncated_bytes, len - 3 - offsets[9]);
    assert_eq!((rec.records, rec.last_seq), (9, 9));
    assert_eq!(fs::metadata(&seg).expect("stat").len(), offsets[9]);
    assert_eq!(log.last_seq(), 9);
    log.append(10, b"again")
        .expect("continue after the torn record");
    log.sync().expect("sync");
    drop(log);

    // A torn header (a few bytes of a new record) is cut as well.
    let mut f = OpenOptions::new().append(true).open(&seg).expect("open");
    std::io::Write::write_all(&mut f, &[1, 2, 3, 4, 5]).expect("write junk");
    drop(f);
    let (mut log, rec) = SegmentLog::open(dir.path(), SegmentOptions::default()).expect("reopen");
    assert!(matches!(
        rec.damage.map(|d| d.reason),
        Some(Corruption::TornHeader { have: 5 })
    ));
    assert_eq!(read_all(&mut log, 10), vec![(10, b"again".to_vec())]);
    drop(log);
    let (_log, rec) = SegmentLog::open(dir.path(), SegmentOptions::default()).expect("reopen");
    assert!(rec.is_clean(), "{rec:?}");
    assert_eq!(rec.last_seq, 10);
}

#[test]
fn a_bit_flip_in_the_middle_drops_everything_after_it_and_reports_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _) = SegmentLog::open(dir.path(), small()).expect("open");
    fill(&mut log, 1..=40);
    log.sync().expect("sync");
    drop(log);
    let segs = seg_files(dir.path());
    assert!(segs.len() >= 4);
    let victim = &segs[1];
    let offsets = record_offsets(victim);
    assert!(offsets.len() >= 3);
    let first_in_victim =
        parse_segment_name(victim.file_name().and_then(|n| n.to_str()).expect("name"))
            .expect("segment");
    // Flip one bit inside the payload of the second record of the second segment.
    let mut bytes = fs::read(victim).expect("read");
    let at = usize::try_from(offsets[1]).expect("small") + RECORD_HEADER_BYTES + 2;
    bytes[at] ^= 0x10;
    fs::write(victim, &bytes).expect("write");

    let (mut log, rec) = SegmentLog::open(dir.path(), small()).expect("reopen");
    let damage = rec.damage.clone().expect("damage");
    assert_eq!(&damage.segment, victim);
    assert_eq!(damage.offset, offsets[1]);
    assert_eq!(damage.expected_seq, first_in_victim + 1);
    assert!(matches!(damage.reason, Corruption::BadChecksum { .. }));
    assert_eq!(rec.dropped_segments, segs[2..].to_vec());
    assert_eq!(rec.last_seq, first_in_victim);
    assert_eq!(seg_files(dir.path()), segs[..2].to_vec());
    assert_eq!(log.last_seq(), first_in_victim);
    assert_eq!(read_all(&mut log, 1).len() as u64, first_in_victim);
    // The stream resumes right after the last good record.
    fill(&mut log, first_in_victim + 1..=first_in_victim + 5);
    log.sync().expect("sync");
    drop(log);
    let (mut log, rec) = SegmentLog::open(dir.path(), small()).expect("reopen");
    assert!(rec.is_clean());
    assert_eq!(
        read_all(&mut log, 1),
        (1..=first_in_victim + 5)
            .map(|s| (s, payload(s)))
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_record_with_a_wrong_seq_ends_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seg = dir.path().join(segment_name(1));
    let mut bytes = Vec::new();
    for seq in [1, 2, 4, 5] {
        bytes.extend(raw_record(seq, &payload(seq)));
    }
    fs::write(&seg, &bytes).expect("write");
    let (mut log, rec) = SegmentLog::open(dir.path(), small()).expect("open");
    let damage = rec.damage.expect("damage");
    assert_eq!(
        damage.reason,
        Corruption::WrongSeq {
            expected: 3,
            found: 4
        }
    );
    assert_eq!(damage.expected_seq, 3);
    assert_eq!(log.last_seq(), 2);
    assert!(matches!(log.append(4, b"x"), Err(LogError::Gap { .. })));
    log.append(3, b"x").expect("3 is next");

    // A segment whose name does not match its first record is emptied and expects its name.
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join(segment_name(5)), raw_record(6, b"x")).expect("write");
    let (log, rec) = SegmentLog::open(dir.path(), small()).expect("open");
    assert_eq!(
        rec.damage.map(|d| d.reason),
        Some(Corruption::WrongSeq {
            expected: 5,
            found: 6
        })
    );
    assert_eq!(
        (log.last_seq(), log.next_seq(), log.first_seq()),
        (4, Some(5), None)
    );
}

#[test]
fn a_segment_that_does_not_continue_the_previous_one_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut first = Vec::new();
    for seq in 1..=3 {
        first.extend(raw_record(seq, &payload(seq)));
    }
    fs::write(dir.path().join(segment_name(1)), first).expect("write");
    let stray = dir.path().join(segment_name(10));
    fs::write(&stray, raw_record(10, b"ten")).expect("write");
    let (log, rec) = SegmentLog::open(dir.path(), small()).expect("open");
    let damage = rec.damage.clone().expect("damage");
    assert_eq!(
        damage.reason,
        Corruption::SegmentGap {
            expected: 4,
            found: 10
        }
    );
    assert_eq!(rec.dropped_segments, vec![stray.clone()]);
    assert!(!stray.exists());
    assert_eq!(log.last_seq(), 3);
}

#[test]
fn files_that_are_not_segments_are_reported_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let strangers = [
        "notes.txt",
        "123.seg",
        "00000000000000000000.seg",
        "99999999999999999999.seg",
        "00000000000000000001.seg.tmp",
    ];
    for name in strangers {
        fs::write(dir.path().join(name), b"garbage").expect("write");
    }
    fs::create_dir(dir.path().join("00000000000000000002.seg")).expect("mkdir");
    let (mut log, rec) = SegmentLog::open(dir.path(), small()).expect("open");
    assert!(rec.is_clean());
    assert_eq!(rec.ignored.len(), strangers.len() + 1);
    fill(&mut log, 1..=20);
    log.sync().expect("sync");
    drop(log);
    let (mut log, rec) = SegmentLog::open(dir.path(), small()).expect("reopen");
    assert!(rec.is_clean());
    assert_eq!(read_all(&mut log, 1).len(), 20);
    for name in strangers {
        assert_eq!(fs::read(dir.path().join(name)).expect("kept"), b"garbage");
    }
}

#[test]
fn random_bytes_as_segments_never_panic_and_recovery_is_stable() {
    let seed = 0x5e6_0001;
    let mut rng = Rng(seed);
    for round in 0..300 {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut content = Vec::new();
        // Sometimes a valid prefix, then random bytes (sometimes a plausible header).
        let valid = rng.below(4);
        for seq in 1..=valid {
            let len = usize::try_from(rng.below(30)).expect("small");
            content.extend(raw_record(seq, &rng.bytes(len)));
        }
        let junk_len = usize::try_from(rng.below(200)).expect("small");
        let mut junk = rng.bytes(junk_len);
        if rng.below(3) == 0 && junk.len() >= RECORD_HEADER_BYTES {
            junk[0..4]
                .copy_from_slice(&u32::try_from(rng.below(300)).expect("small").to_le_bytes());
            junk[8..16].copy_from_slice(&(valid + 1).to_le_bytes());
        }
        content.extend(junk);
        fs::write(dir.path().join(segment_name(1)), &content).expect("write");
        if rng.below(2) == 0 {
            fs::write(
                dir.path().join(segment_name(2 + rng.below(8))),
                rng.bytes(40),
            )
            .expect("write");
        }
        let (mut log, rec) = SegmentLog::open(dir.path(), small())
            .unwrap_or_else(|e| panic!("seed {seed:#x} round {round}: open failed: {e}"));
        assert!(
            log.last_seq() >= valid,
            "seed {seed:#x} round {round}: {rec:?}"
        );
        let first = log.first_seq().unwrap_or(1);
        let records = read_all(&mut log, first);
        assert_eq!(records.len() as u64, rec.records);
        let next = log.last_seq() + 1;
        log.append(next, b"after").expect("append after recovery");
        log.sync().expect("sync");
        drop(log);
        let (log, rec) = SegmentLog::open(dir.path(), small()).expect("reopen");
        assert!(
            rec.is_clean(),
            "seed {seed:#x} round {round}: second recovery {rec:?}"
        );
        assert_eq!(log.last_seq(), next);
        // Readers over the raw files never panic either.
        for item in SegmentReader::open(dir.path(), 1).into_iter().flatten() {
            let _ = item;
        }
    }
}

#[test]
fn readers_without_the_log_object_stop_at_an_append_in_progress() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _) = SegmentLog::open(dir.path(), small()).expect("open");
    fill(&mut log, 1..=30);
    log.sync().expect("sync");
    let all = SegmentReader::open(dir.path(), 1)
        .expect("reader")
        .collect::<Result<Vec<_>, _>>()
        .expect("read");
    assert_eq!(all, (1..=30).map(|s| (s, payload(s))).collect::<Vec<_>>());
    let tail = SegmentReader::open(dir.path(), 25)
        .expect("reader")
        .map(|r| r.expect("record").0)
        .collect::<Vec<_>>();
    assert_eq!(tail, (25..=30).collect::<Vec<_>>());
    // Half a record at the end of the last segment looks like an append in progress.
    let seg = seg_files(dir.path()).pop().expect("segment");
    let mut f = OpenOptions::new().append(true).open(&seg).expect("open");
    std::io::Write::write_all(&mut f, &raw_record(31, b"partial")[..20]).expect("write");
    let n = SegmentReader::open(dir.path(), 1)
        .expect("reader")
        .collect::<Result<Vec<_>, _>>()
        .expect("no error for a torn tail")
        .len();
    assert_eq!(n, 30);
    // A bad checksum is an error, not an end.
    let first = seg_files(dir.path()).remove(0);
    let mut bytes = fs::read(&first).expect("read");
    bytes[RECORD_HEADER_BYTES] ^= 1;
    fs::write(&first, &bytes).expect("write");
    let results: Vec<_> = SegmentReader::open(dir.path(), 1)
        .expect("reader")
        .collect();
    assert!(matches!(
        results.last(),
        Some(Err(LogError::Corrupt {
            reason: Corruption::BadChecksum { .. },
            ..
        }))
    ));
    drop(log);
}

#[test]
fn trim_keeps_the_expected_next_seq_even_when_everything_is_trimmed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _) = SegmentLog::open(dir.path(), small()).expect("open");
    fill(&mut log, 1..=40);
    log.sync().expect("sync");
    let before = log.segment_count();
    let deleted = log.trim_through(20).expect("trim");
    assert!(deleted > 0);
    assert_eq!(log.segment_count(), before - deleted);
    let first = log.first_seq().expect("records left");
    assert!(first <= 21 && first > 1, "first {first}");
    assert!(matches!(
        log.read_from(1),
        Err(LogError::NotHeld { seq: 1, .. })
    ));
    assert_eq!(read_all(&mut log, 21).len(), 20);

    log.trim_through(40).expect("trim all");
    assert_eq!(log.first_seq(), None);
    assert_eq!(log.last_seq(), 40);
    assert_eq!(
        log.segment_count(),
        1,
        "one empty segment keeps the position"
    );
    assert!(read_all(&mut log, 41).is_empty());
    assert!(matches!(
        log.read_from(40),
        Err(LogError::NotHeld { seq: 40, first: 41 })
    ));
    assert!(matches!(
        log.append(40, b"x"),
        Err(LogError::Duplicate { .. })
    ));
    assert!(matches!(log.append(42, b"x"), Err(LogError::Gap { .. })));
    drop(log);
    let (mut log, rec) = SegmentLog::open(dir.path(), small()).expect("reopen");
    assert!(rec.is_clean());
    assert_eq!((rec.last_seq, rec.first_seq, rec.records), (40, None, 0));
    fill(&mut log, 41..=45);
    assert_eq!(log.sync().expect("sync"), 45);
    assert_eq!(read_all(&mut log, 41).len(), 5);
}

#[test]
fn reset_drops_everything_and_expects_the_given_seq() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _) = SegmentLog::open(dir.path(), small()).expect("open");
    fill(&mut log, 1..=30);
    log.sync().expect("sync");
    assert!(matches!(log.reset(0), Err(LogError::InvalidSeq(0))));
    log.reset(7).expect("reset");
    assert_eq!(
        (log.last_seq(), log.durable_seq(), log.first_seq()),
        (6, 6, None)
    );
    assert_eq!(
        seg_files(dir.path()),
        vec![dir.path().join(segment_name(7))]
    );
    drop(log);
    let (mut log, rec) = SegmentLog::open(dir.path(), small()).expect("reopen");
    assert!(rec.is_clean());
    assert_eq!(log.next_seq(), Some(7));
    assert!(matches!(log.append(8, b"x"), Err(LogError::Gap { .. })));
    fill(&mut log, 7..=9);
    log.sync().expect("sync");
    assert_eq!(read_all(&mut log, 7).len(), 3);
}
