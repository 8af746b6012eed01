//! Probes for programs that speak neither libft nor sd_notify: TCP connect, HTTP GET, exec.
//!
//! A probe only reports pass or fail with a detail; the verdict (how many failures make a hang)
//! belongs to the state machine in [`crate::machine`].

/// A parsed `http://host:port/path` URL: (host, port, path).
pub fn parse_http_url(url: &str) -> Option<(String, u16, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || path.chars().any(|c| c.is_control() || c == ' ') {
        return None;
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().ok()?),
        _ => (authority, 80),
    };
    if host.is_empty() {
        return None;
    }
    Some((host.trim_start_matches('[').trim_end_matches(']').to_owned(), port, path.to_owned()))
}
