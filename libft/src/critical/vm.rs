//! Small facts about this process's address space: the page size, page rounding, and what
//! `/proc/self/maps` says lives in a range of addresses.
//!
//! Read-only: nothing here maps, unmaps or changes protection of memory.

use std::io;
use std::sync::OnceLock;

/// The page size assumed when `sysconf` cannot tell (every Linux target ftkit builds for uses it).
const FALLBACK_PAGE_SIZE: usize = 4096;

/// The system page size.
pub fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let raw = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(raw)
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(FALLBACK_PAGE_SIZE)
    })
}

/// `value` rounded down to a multiple of the power of two `align`.
pub fn align_down(value: usize, align: usize) -> usize {
    value & !(align - 1)
}

/// `value` rounded up to a multiple of the power of two `align`, or None on overflow.
pub fn align_up(value: usize, align: usize) -> Option<usize> {
    Some(value.checked_add(align - 1)? & !(align - 1))
}

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// First address.
    pub start: usize,
    /// End address (exclusive).
    pub end: usize,
    /// Permissions as printed, e.g. `rw-p`.
    pub perms: String,
    /// The backing file or pseudo-name (`[heap]`), empty for anonymous memory.
    pub name: String,
}

impl MapEntry {
    fn readable_writable(&self) -> bool {
        self.perms.starts_with("rw")
    }
}

impl std::fmt::Display for MapEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}-{:#x} {}", self.start, self.end, self.perms)?;
        if !self.name.is_empty() {
            write!(f, " {}", self.name)?;
        }
        Ok(())
    }
}

/// The mappings of this process that intersect `[start, end)`, in address order.
pub fn mappings_in(start: usize, end: usize) -> io::Result<Vec<MapEntry>> {
    let text = std::fs::read_to_string("/proc/self/maps")?;
    Ok(text
        .lines()
        .filter_map(parse_line)
        .filter(|m| m.start < end && start < m.end)
        .collect())
}

fn parse_line(line: &str) -> Option<MapEntry> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?.to_owned();
    // offset, device, inode, then the optional name (which may contain spaces).
    let name = fields.nth(3).map_or(String::new(), |first| {
        std::iter::once(first)
            .chain(fields)
            .collect::<Vec<_>>()
            .join(" ")
    });
    Some(MapEntry {
        start: usize::from_str_radix(start, 16).ok()?,
        end: usize::from_str_radix(end, 16).ok()?,
        perms,
        name,
    })
}

/// Checks that every byte of `[start, end)` is mapped readable and writable, so that libft
/// may copy it at checkpoints and overwrite it at recovery. Returns what is wrong otherwise.
pub fn check_read_write(start: usize, end: usize) -> io::Result<Result<(), String>> {
    let maps = mappings_in(start, end)?;
    let mut next = start;
    for m in &maps {
        if m.start > next {
            return Ok(Err(format!("{next:#x}-{:#x} is not mapped", m.start)));
        }
        if !m.readable_writable() {
            return Ok(Err(format!("the mapping {m} is not readable and writable")));
        }
        next = m.end;
        if next >= end {
            return Ok(Ok(()));
        }
    }
    Ok(Err(format!("{next:#x}-{end:#x} is not mapped")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding() {
        assert_eq!(align_down(4097, 4096), 4096);
        assert_eq!(align_up(4097, 4096), Some(8192));
        assert_eq!(align_up(4096, 4096), Some(4096));
        assert_eq!(align_up(usize::MAX, 4096), None);
        assert!(page_size().is_power_of_two());
    }

    #[test]
    fn parses_maps_lines() {
        let m = parse_line("7f00-7f10 rw-p 00000000 00:00 0 ").expect("anonymous line");
        assert_eq!(
            (m.start, m.end, m.perms.as_str(), m.name.as_str()),
            (0x7f00, 0x7f10, "rw-p", "")
        );
        let m =
            parse_line("5000-6000 r-xp 00001000 fd:00 1234  /usr/bin/my prog").expect("file line");
        assert_eq!(m.name, "/usr/bin/my prog");
        assert!(parse_line("garbage").is_none());
    }

    #[test]
    fn stack_is_read_write_and_null_page_is_not_mapped() {
        let local = [0u8; 64];
        let addr = local.as_ptr() as usize;
        assert_eq!(check_read_write(addr, addr + 64).expect("maps"), Ok(()));
        assert!(check_read_write(0, page_size()).expect("maps").is_err());
    }
}
