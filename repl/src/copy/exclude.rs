//! Exclude lists of copy mode: name patterns (`*` and `?` wildcards) matched against each
//! component of a path beneath the fileset root, so that an entry whose name matches (and
//! everything beneath it) is no part of the replicated fileset. Owns the pattern syntax and its
//! validation; it never touches the file system and never panics on any name or pattern.
//!
//! Syntax: a pattern is matched against one name (never a path: it cannot contain `/`). `*`
//! matches any run of bytes, the empty one included; `?` matches exactly one character (one
//! UTF-8 sequence; a byte that does not start one counts as a character); every other character
//! matches itself, case-sensitively. There is no escaping and no `[...]` class (`[` is an
//! ordinary character). Unlike the shell, a wildcard also matches a leading `.`: `*.swp`
//! matches vim's `.notes.txt.swp`.

/// Most patterns in one exclude list (each event is matched against every pattern).
pub const MAX_EXCLUDE_PATTERNS: usize = 64;

/// Longest pattern in bytes: a name longer than `NAME_MAX` cannot exist.
pub const MAX_PATTERN_BYTES: usize = 255;

/// Why a pattern or a list of patterns is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExcludeError {
    /// an empty pattern
    #[error("an exclude pattern must not be empty")]
    Empty,
    /// the pattern names a path, not a name
    #[error(
        "exclude pattern `{0}` contains `/`: patterns match a single name (the last component of a path), not a path"
    )]
    Slash(String),
    /// the pattern contains NUL
    #[error("exclude pattern {0:?} contains a NUL byte")]
    Nul(String),
    /// `.` or `..`
    #[error("exclude pattern `{0}` names `.` or `..`, which are never entries of a directory")]
    Dot(String),
    /// longer than a name can be
    #[error(
        "exclude pattern `{0}` is longer than {MAX_PATTERN_BYTES} bytes (no name can match it)"
    )]
    TooLong(String),
    /// nothing but `*`
    #[error("exclude pattern `{0}` matches every name: it would exclude the whole fileset")]
    Everything(String),
    /// too many patterns
    #[error("{0} exclude patterns; at most {MAX_EXCLUDE_PATTERNS} are allowed")]
    TooMany(usize),
}

/// One validated pattern (see the module documentation for its syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePattern {
    text: String,
}

impl NamePattern {
    /// Validates `pattern`: not empty, no `/` or NUL, not `.` or `..`, at most
    /// [`MAX_PATTERN_BYTES`], and not made of `*` alone.
    pub fn new(pattern: &str) -> Result<NamePattern, ExcludeError> {
        let owned = || pattern.to_owned();
        if pattern.is_empty() {
            return Err(ExcludeError::Empty);
        }
        if pattern.contains('/') {
            return Err(ExcludeError::Slash(owned()));
        }
        if pattern.contains('\0') {
            return Err(ExcludeError::Nul(owned()));
        }
        if pattern == "." || pattern == ".." {
            return Err(ExcludeError::Dot(owned()));
        }
        if pattern.len() > MAX_PATTERN_BYTES {
            return Err(ExcludeError::TooLong(owned()));
        }
        if pattern.bytes().all(|b| b == b'*') {
            return Err(ExcludeError::Everything(owned()));
        }
        Ok(NamePattern { text: owned() })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `name` (one path component) matches.
    pub fn matches(&self, name: &[u8]) -> bool {
        glob(self.text.as_bytes(), name)
    }
}

impl std::fmt::Display for NamePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// An exclude list: a path is excluded when any of its components matches any pattern (an
/// excluded directory takes everything beneath it along). The default list excludes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exclude {
    patterns: Vec<NamePattern>,
}

impl Exclude {
    /// Validates every pattern (duplicates are kept once) and their number.
    pub fn new<I, S>(patterns: I) -> Result<Exclude, ExcludeError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list = Exclude::default();
        for p in patterns {
            list = list.with(NamePattern::new(p.as_ref())?)?;
        }
        Ok(list)
    }

    /// The list with `pattern` added (unless it is in it already).
    pub fn with(mut self, pattern: NamePattern) -> Result<Exclude, ExcludeError> {
        if self.patterns.contains(&pattern) {
            return Ok(self);
        }
        if self.patterns.len() >= MAX_EXCLUDE_PATTERNS {
            return Err(ExcludeError::TooMany(self.patterns.len() + 1));
        }
        self.patterns.push(pattern);
        Ok(self)
    }

    /// Whether the list excludes nothing.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The patterns, in the order given.
    pub fn patterns(&self) -> &[NamePattern] {
        &self.patterns
    }

    /// Whether the name `name` (one component) matches a pattern.
    pub fn excludes_name(&self, name: &[u8]) -> bool {
        self.patterns.iter().any(|p| p.matches(name))
    }

    /// Whether the relative path `path` (components separated by `/`) is excluded: one of its
    /// components matches.
    pub fn excludes(&self, path: &[u8]) -> bool {
        !self.patterns.is_empty()
            && path
                .split(|&b| b == b'/')
                .any(|name| self.excludes_name(name))
    }
}

/// Bytes of the character starting at `name[at]` (1 for a byte that starts no UTF-8 sequence),
/// never beyond the end of `name`.
fn char_len(name: &[u8], at: usize) -> usize {
    let want = match name.get(at) {
        Some(b) if *b >= 0xF0 && *b < 0xF8 => 4,
        Some(b) if *b >= 0xE0 && *b < 0xF0 => 3,
        Some(b) if *b >= 0xC0 && *b < 0xE0 => 2,
        _ => 1,
    };
    // A truncated sequence counts as bytes of its own, so `?` never spans past the name.
    let rest = &name[at.min(name.len())..];
    let continued = rest
        .iter()
        .skip(1)
        .take(want - 1)
        .take_while(|b| (0x80..0xC0).contains(*b))
        .count();
    if continued == want - 1 { want } else { 1 }
}

/// Wildcard matching without recursion: on a mismatch, the last `*` seen absorbs one more byte
/// and matching resumes after it (linear in the name for each `*`).
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0usize, 0usize);
    // (pattern index just after the last `*`, name index where its absorption ends)
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                p += 1;
                star = Some((p, n));
                continue;
            }
            Some(b'?') => {
                p += 1;
                n += char_len(name, n);
                continue;
            }
            Some(&c) if c == name[n] => {
                p += 1;
                n += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((after, absorbed)) => {
                p = after;
                n = absorbed + 1;
                star = Some((after, n));
            }
            None => return false,
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, name: &[u8]) -> bool {
        NamePattern::new(pattern).expect("valid").matches(name)
    }

    #[test]
    fn exclude_wildcards_match_names() {
        assert!(m(".tmp-*", b".tmp-42-1234"));
        assert!(m(".tmp-*", b".tmp-"));
        assert!(!m(".tmp-*", b"00000000000000000042.ckpt"));
        assert!(!m(".tmp-*", b"x.tmp-1"));
        assert!(
            m("*.swp", b".notes.txt.swp"),
            "a wildcard matches a leading dot"
        );
        assert!(m("*.swp", b".swp"));
        assert!(!m("*.swp", b"a.swpx"));
        assert!(m("a*b*c", b"abc"));
        assert!(m("a*b*c", b"aXbYbZc"));
        assert!(!m("a*b*c", b"aXbYcZ"));
        assert!(m("*x*", b"x"));
        assert!(m("??", b"ab"));
        assert!(!m("??", b"abc"));
        assert!(!m("??", b"a"));
        assert!(m("?", "é".as_bytes()), "? is one character, not one byte");
        assert!(!m("??", "é".as_bytes()));
        assert!(
            m("?", b"\xff"),
            "a byte that starts no character counts as one"
        );
        assert!(
            m("??", b"\xc3x"),
            "a truncated sequence is bytes of its own"
        );
        assert!(m("*?", b"\xe2\x82"));
        assert!(m("[ab]", b"[ab]"), "brackets are ordinary characters");
        assert!(!m("[ab]", b"a"));
        assert!(m("Core", b"Core"));
        assert!(!m("Core", b"core"));
        // Many stars against a long name stay cheap (no exponential backtracking).
        let long = vec![b'a'; 4096];
        assert!(!m("*a*a*a*a*a*a*b", &long));
    }

    #[test]
    fn exclude_bad_patterns_are_refused_with_the_reason() {
        assert_eq!(NamePattern::new(""), Err(ExcludeError::Empty));
        assert!(matches!(
            NamePattern::new("dir/*.tmp"),
            Err(ExcludeError::Slash(_))
        ));
        assert!(matches!(
            NamePattern::new("a\0b"),
            Err(ExcludeError::Nul(_))
        ));
        assert!(matches!(NamePattern::new(".."), Err(ExcludeError::Dot(_))));
        assert!(matches!(
            NamePattern::new(&"x".repeat(MAX_PATTERN_BYTES + 1)),
            Err(ExcludeError::TooLong(_))
        ));
        assert!(matches!(
            NamePattern::new("**"),
            Err(ExcludeError::Everything(_))
        ));
        assert!(
            NamePattern::new("*?").is_ok(),
            "names of one character or more"
        );
        let many: Vec<String> = (0..=MAX_EXCLUDE_PATTERNS)
            .map(|i| format!("p{i}"))
            .collect();
        assert_eq!(
            Exclude::new(&many),
            Err(ExcludeError::TooMany(MAX_EXCLUDE_PATTERNS + 1))
        );
        let err = NamePattern::new("a/b").expect_err("slash").to_string();
        assert!(
            err.contains("`a/b`") && err.contains("single name"),
            "{err}"
        );
    }

    #[test]
    fn exclude_any_component_excludes_the_path() {
        let ex = Exclude::new([".tmp-*", "cache", ".tmp-*"]).expect("valid");
        assert_eq!(ex.patterns().len(), 2, "duplicates are kept once");
        assert!(ex.excludes(b".tmp-1-2"));
        assert!(ex.excludes(b"sub/.tmp-1-2"));
        assert!(ex.excludes(b"cache"));
        assert!(ex.excludes(b"cache/deep/file"));
        assert!(ex.excludes(b"a/cache/b"));
        assert!(!ex.excludes(b"caches/file"));
        assert!(!ex.excludes(b"00000000000000000001.ckpt"));
        assert!(!Exclude::default().excludes(b".tmp-1"));
        assert!(Exclude::default().is_empty());
    }
}
