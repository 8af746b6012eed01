//! Round trips of whole images through the public API: full and incremental, several regions,
//! odd lengths, chunk splitting above MAX_CHUNK, reading with and without a visitor.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use ckpt::{ImageHeader, ImageWriter, MAX_CHUNK, RegionDesc, read_image};

const APP: &str = "roundtrip";
const PAGE: usize = 4096;

fn header(seq: u64, parent: Option<u64>, lens: &[usize]) -> ImageHeader {
    ImageHeader {
        app: APP.into(),
        stream: 1,
        seq,
        parent,
        created_unix_ns: ckpt::unix_now_ns(),
        page_size: u32::try_from(PAGE).unwrap(),
        regions: lens
            .iter()
            .enumerate()
            .map(|(i, &len)| RegionDesc {
                id: 100 + u32::try_from(i).unwrap(),
                base: 0x6000_0000_0000 + (i as u64) * 0x1000_0000,
                len: len as u64,
            })
            .collect(),
    }
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i * 31 + usize::from(salt) * 7) % 251).unwrap())
        .collect()
}

/// Reads `img` and applies it to `bufs`; returns the visited (region, offset, len) triples.
fn apply(img: &[u8], bufs: &mut [Vec<u8>]) -> (ckpt::ImageSummary, Vec<(u32, u64, usize)>) {
    let mut seen = Vec::new();
    let mut visit = |r: u32, off: u64, data: &[u8]| {
        let buf = &mut bufs[usize::try_from(r).unwrap()];
        let off = usize::try_from(off).unwrap();
        buf[off..off + data.len()].copy_from_slice(data);
        seen.push((r, off as u64, data.len()));
    };
    let (_, summary) = read_image(img, APP, Some(&mut visit)).unwrap();
    (summary, seen)
}

#[test]
fn full_image_with_odd_regions_round_trips() {
    let lens = [3 * PAGE, 5001, 1, 2 * MAX_CHUNK + 12_345];
    let h = header(1, None, &lens);
    let regions: Vec<Vec<u8>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| pattern(l, u8::try_from(i).unwrap()))
        .collect();
    let mut w = ImageWriter::new(Vec::new(), &h).unwrap();
    for (i, data) in regions.iter().enumerate() {
        w.chunk(u32::try_from(i).unwrap(), 0, data).unwrap();
    }
    let (img, written) = w.finish().unwrap();
    // The big region is split in three chunks, the others are one each.
    assert_eq!(written.chunks, 3 + 3);
    assert_eq!(written.data_bytes, lens.iter().sum::<usize>() as u64);
    assert_eq!(written.file_bytes, img.len() as u64);

    let (read_header, summary) = read_image(&img[..], APP, None).unwrap();
    assert_eq!(read_header, h);
    assert_eq!(summary, written);

    let mut bufs: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0; l]).collect();
    let (summary, seen) = apply(&img, &mut bufs);
    assert_eq!(summary, written);
    assert_eq!(bufs, regions);
    let split: Vec<_> = seen.iter().filter(|s| s.0 == 3).collect();
    assert_eq!(
        split,
        vec![
            &(3, 0, MAX_CHUNK),
            &(3, MAX_CHUNK as u64, MAX_CHUNK),
            &(3, 2 * MAX_CHUNK as u64, 12_345)
        ]
    );
    assert!(seen.iter().all(|s| s.2 <= MAX_CHUNK));
}

#[test]
fn incremental_image_applies_changed_pages_only() {
    let lens = [8 * PAGE, 2 * PAGE + 77];
    let base: Vec<Vec<u8>> = vec![pattern(lens[0], 1), pattern(lens[1], 2)];
    let mut full = ImageWriter::new(Vec::new(), &header(4, None, &lens)).unwrap();
    full.chunk(0, 0, &base[0]).unwrap();
    full.chunk(1, 0, &base[1]).unwrap();
    let (full_img, _) = full.finish().unwrap();

    // Change pages 1, 2 and 6 of region 0 and the short last page of region 1.
    let mut next = base.clone();
    for p in [1usize, 2, 6] {
        next[0][p * PAGE..(p + 1) * PAGE].copy_from_slice(&pattern(PAGE, 9));
    }
    let tail = 2 * PAGE;
    next[1][tail..].copy_from_slice(&pattern(77, 5));
    let mut inc = ImageWriter::new(Vec::new(), &header(5, Some(4), &lens)).unwrap();
    inc.chunk(0, PAGE as u64, &next[0][PAGE..3 * PAGE]).unwrap();
    inc.chunk(0, 6 * PAGE as u64, &next[0][6 * PAGE..7 * PAGE])
        .unwrap();
    inc.chunk(1, tail as u64, &next[1][tail..]).unwrap();
    let (inc_img, inc_sum) = inc.finish().unwrap();
    assert_eq!(inc_sum.chunks, 3);
    assert_eq!(inc_sum.data_bytes, (3 * PAGE + 77) as u64);

    let (h, _) = read_image(&inc_img[..], APP, None).unwrap();
    assert_eq!(h.parent, Some(4));

    let mut bufs: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0; l]).collect();
    apply(&full_img, &mut bufs);
    assert_eq!(bufs, base);
    let (_, seen) = apply(&inc_img, &mut bufs);
    assert_eq!(bufs, next);
    assert_eq!(
        seen,
        vec![
            (0, PAGE as u64, 2 * PAGE),
            (0, 6 * PAGE as u64, PAGE),
            (1, tail as u64, 77)
        ]
    );
}

#[test]
fn image_without_chunks_and_without_regions_round_trips() {
    let h = header(9, Some(8), &[]);
    let (img, s) = ImageWriter::new(Vec::new(), &h).unwrap().finish().unwrap();
    assert_eq!((s.chunks, s.data_bytes), (0, 0));
    let mut called = false;
    let mut visit = |_: u32, _: u64, _: &[u8]| called = true;
    assert_eq!(read_image(&img[..], APP, Some(&mut visit)).unwrap(), (h, s));
    assert!(!called);
}

#[test]
fn images_stream_through_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let lens = [MAX_CHUNK + 1];
    let data = pattern(lens[0], 3);
    let file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut w = ImageWriter::new(file, &header(1, None, &lens)).unwrap();
    w.chunk(0, 0, &data).unwrap();
    let (file, s) = w.finish().unwrap();
    drop(file);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), s.file_bytes);
    let mut out = vec![0u8; lens[0]];
    let mut visit = |_: u32, off: u64, d: &[u8]| {
        let off = usize::try_from(off).unwrap();
        out[off..off + d.len()].copy_from_slice(d);
    };
    let f = std::fs::File::open(&path).unwrap();
    read_image(f, APP, Some(&mut visit)).unwrap();
    assert_eq!(out, data);
    assert_eq!(
        ckpt::read_header(std::fs::File::open(&path).unwrap(), APP)
            .unwrap()
            .seq,
        1
    );
}
