//! Probes for programs that speak neither libft nor sd_notify: TCP connect, HTTP GET, exec.
//!
//! A probe runs once, bounded by its timeout, and only reports pass or fail with a detail; the
//! verdict (how many failures make a hang) belongs to the state machine in [`crate::machine`].
//! It must never buffer without bound what a probed server sends, nor leave a probe command (or
//! its process group) running or unreaped after it returns.

use std::io;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::command::{GroupKill, exit_status};
use crate::config::{ProbeConfig, ProbeKind};
use crate::machine::ExitStatus;

/// The most an HTTP probe reads of an answer while looking for the status line.
pub const MAX_HTTP_STATUS_READ: usize = 8 * 1024;
/// How long a killed probe command may take to be reaped before it is left to tokio's orphan
/// reaper (a process in uninterruptible sleep cannot die at once).
pub const EXEC_REAP_GRACE: Duration = Duration::from_secs(1);
/// The longest excerpt of a malformed status line shown in a detail.
const SHOWN_STATUS_LINE: usize = 100;
const USER_AGENT: &str = concat!("ftkit-watchd/", env!("CARGO_PKG_VERSION"));

/// What one check saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// Whether it passed.
    pub ok: bool,
    /// What it saw, for a person (`HTTP 200 OK`, `connection refused`, `timed out after 1s`).
    pub detail: String,
}

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The probe lacks its target (configuration validation should have caught it).
    #[error("no `{0}` configured")]
    Missing(&'static str),
    /// The URL is not one the HTTP probe understands.
    #[error("`{0}` is not an http://host:port/path URL")]
    BadUrl(String),
    /// The check took longer than the probe's timeout.
    #[error("timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The TCP connection could not be made.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// The address tried.
        address: String,
        /// Why.
        source: io::Error,
    },
    /// The HTTP request could not be sent.
    #[error("cannot send the request: {0}")]
    Send(io::Error),
    /// The HTTP answer could not be read.
    #[error("cannot read the answer: {0}")]
    Receive(io::Error),
    /// The server closed the connection before a whole status line.
    #[error("connection closed before a status line")]
    NoStatusLine,
    /// No line end within [`MAX_HTTP_STATUS_READ`] bytes.
    #[error("no status line within the first {0} bytes")]
    StatusLineTooLong(usize),
    /// The first line is not `HTTP/x.y NNN reason`.
    #[error("malformed status line {0}")]
    MalformedStatus(String),
    /// The server answered with a status other than 2xx or 3xx.
    #[error("HTTP {code}{reason}")]
    BadStatus {
        /// The status code.
        code: u16,
        /// The reason phrase with a leading space, or empty.
        reason: String,
    },
    /// The command could not be started.
    #[error("cannot run `{program}`: {source}")]
    Spawn {
        /// argv\[0\].
        program: String,
        /// Why.
        source: io::Error,
    },
    /// Waiting for the command failed.
    #[error("cannot wait for the command: {0}")]
    Wait(io::Error),
    /// The command ended unsuccessfully.
    #[error("command ended with {0}")]
    Failed(ExitStatus),
}

/// Runs `probe` once, bounded by `probe.timeout`.
pub async fn check(probe: &ProbeConfig) -> ProbeOutcome {
    let timeout = probe.timeout;
    let result = match probe.kind.get_ref() {
        ProbeKind::Tcp => match &probe.address {
            Some(address) => within(timeout, tcp(address)).await,
            None => Err(ProbeError::Missing("address")),
        },
        ProbeKind::Http => match &probe.url {
            Some(url) => within(timeout, http(url)).await,
            None => Err(ProbeError::Missing("url")),
        },
        ProbeKind::Exec => match &probe.command {
            Some(argv) => exec(argv, timeout).await,
            None => Err(ProbeError::Missing("command")),
        },
    };
    match result {
        Ok(detail) => ProbeOutcome { ok: true, detail },
        Err(e) => ProbeOutcome {
            ok: false,
            detail: e.to_string(),
        },
    }
}

async fn within(
    timeout: Duration,
    check: impl Future<Output = Result<String, ProbeError>>,
) -> Result<String, ProbeError> {
    tokio::time::timeout(timeout, check)
        .await
        .unwrap_or(Err(ProbeError::Timeout(timeout)))
}

async fn tcp(address: &str) -> Result<String, ProbeError> {
    let stream = TcpStream::connect(address)
        .await
        .map_err(|source| ProbeError::Connect {
            address: address.to_owned(),
            source,
        })?;
    Ok(match stream.peer_addr() {
        Ok(peer) => format!("connected to {peer}"),
        Err(_) => format!("connected to {address}"),
    })
}

async fn http(url: &str) -> Result<String, ProbeError> {
    let (host, port, path) =
        parse_http_url(url).ok_or_else(|| ProbeError::BadUrl(url.to_owned()))?;
    let mut stream = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|source| ProbeError::Connect {
            address: format!("{host} port {port}"),
            source,
        })?;
    let bracketed = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let authority = if port == 80 {
        bracketed
    } else {
        format!("{bracketed}:{port}")
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {USER_AGENT}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(ProbeError::Send)?;
    let line = read_status_line(&mut stream).await?;
    let (code, reason) = parse_status_line(&line)?;
    if (200..400).contains(&code) {
        Ok(format!("HTTP {code}{reason}"))
    } else {
        Err(ProbeError::BadStatus { code, reason })
    }
}

/// Reads up to the first line end, never more than [`MAX_HTTP_STATUS_READ`] bytes.
async fn read_status_line(stream: &mut TcpStream) -> Result<Vec<u8>, ProbeError> {
    let mut buf = vec![0u8; MAX_HTTP_STATUS_READ];
    let mut filled = 0;
    loop {
        if let Some(end) = buf[..filled].iter().position(|&b| b == b'\n') {
            buf.truncate(end);
            return Ok(buf);
        }
        if filled == buf.len() {
            return Err(ProbeError::StatusLineTooLong(MAX_HTTP_STATUS_READ));
        }
        match stream.read(&mut buf[filled..]).await {
            Ok(0) => return Err(ProbeError::NoStatusLine),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProbeError::Receive(e)),
        }
    }
}

/// `HTTP/1.1 200 OK` → (200, " OK").
fn parse_status_line(line: &[u8]) -> Result<(u16, String), ProbeError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let malformed = || {
        let text = String::from_utf8_lossy(line);
        let mut shown: String = text
            .chars()
            .take(SHOWN_STATUS_LINE)
            .flat_map(char::escape_debug)
            .collect();
        if text.chars().count() > SHOWN_STATUS_LINE {
            shown.push('…');
        }
        ProbeError::MalformedStatus(format!("`{shown}`"))
    };
    let text = std::str::from_utf8(line).map_err(|_| malformed())?;
    let mut parts = text.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    let reason = parts.next().unwrap_or_default();
    let version_ok = version
        .strip_prefix("HTTP/")
        .and_then(|v| v.split_once('.'))
        .is_some_and(|(major, minor)| {
            [major, minor]
                .iter()
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        });
    if !version_ok || code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    let code: u16 = code.parse().map_err(|_| malformed())?;
    if !(100..600).contains(&code) || reason.chars().any(|c| c.is_control() && c != '\t') {
        return Err(malformed());
    }
    let reason = reason.trim();
    Ok((
        code,
        if reason.is_empty() {
            String::new()
        } else {
            format!(" {reason}")
        },
    ))
}

/// Runs argv with null stdio in its own process group; on timeout kills the group and reaps
/// the command.
async fn exec(argv: &[String], timeout: Duration) -> Result<String, ProbeError> {
    let (program, args) = argv.split_first().ok_or(ProbeError::Missing("command"))?;
    let mut child: Child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .process_group(0)
        .spawn()
        .map_err(|source| ProbeError::Spawn {
            program: program.clone(),
            source,
        })?;
    // Declared after `child`, so dropped before it: when this future is cancelled, the group is
    // killed while its leader is still unreaped (its pid, hence the group id, cannot be reused).
    let mut group = GroupKill::of(&child);
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => {
            // Reaped: the group id may now be reused, so it must not be signalled any more.
            group.disarm();
            if status.success() {
                Ok("exit code 0".into())
            } else {
                Err(ProbeError::Failed(exit_status(status)))
            }
        }
        Ok(Err(e)) => {
            // The child's state is unknown; kill_on_drop still covers the main process.
            group.disarm();
            Err(ProbeError::Wait(e))
        }
        Err(_) => {
            group.kill();
            // Already dead by the group kill; this only covers a failed killpg.
            let _ = child.start_kill();
            if tokio::time::timeout(EXEC_REAP_GRACE, child.wait())
                .await
                .is_err()
            {
                tracing::warn!(program = %program, "probe command did not die within {EXEC_REAP_GRACE:?} of SIGKILL");
            }
            Err(ProbeError::Timeout(timeout))
        }
    }
}

/// A parsed `http://host:port/path` URL: (host, port, path). IPv6 hosts are written in brackets
/// (`http://[::1]:8080/`) and returned without them. The port defaults to 80.
pub fn parse_http_url(url: &str) -> Option<(String, u16, String)> {
    let rest = url.strip_prefix("http://")?;
    // Whatever goes into the request line or the Host header must not be able to split them.
    if rest.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return None;
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => {
            let (host, tail) = bracketed.split_once(']')?;
            let port = match tail {
                "" => None,
                tail => Some(tail.strip_prefix(':')?),
            };
            if !host.contains(':') {
                return None;
            }
            (host, port)
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    let port = match port {
        None => 80,
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok().filter(|&p| p != 0)?,
        Some(_) => return None,
    };
    if host.is_empty() || host.contains(['[', ']', '@', '?', '#']) {
        return None;
    }
    Some((host.to_owned(), port, path.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Instant;

    use tokio::net::TcpListener;

    use super::*;

    const SHORT: Duration = Duration::from_millis(200);
    /// Generous bound for "fails within its timeout" on a loaded 2-core machine.
    const PROMPTLY: Duration = Duration::from_secs(2);

    fn probe(kind: ProbeKind, timeout: Duration) -> ProbeConfig {
        ProbeConfig {
            kind: toml::Spanned::new(0..0, kind),
            address: None,
            url: None,
            command: None,
            period: Duration::from_secs(1),
            timeout,
            failures: 1,
            initial_delay: Duration::ZERO,
        }
    }

    fn tcp_probe(address: String) -> ProbeConfig {
        ProbeConfig {
            address: Some(address),
            ..probe(ProbeKind::Tcp, SHORT)
        }
    }

    fn http_probe(url: String, timeout: Duration) -> ProbeConfig {
        ProbeConfig {
            url: Some(url),
            ..probe(ProbeKind::Http, timeout)
        }
    }

    fn exec_probe(argv: &[&str], timeout: Duration) -> ProbeConfig {
        ProbeConfig {
            command: Some(argv.iter().map(|s| (*s).to_owned()).collect()),
            ..probe(ProbeKind::Exec, timeout)
        }
    }

    /// A port nobody listens on: bound, then closed.
    async fn closed_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("addr").port()
    }

    #[tokio::test]
    async fn tcp_passes_against_a_listener_and_fails_against_a_closed_port() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let out = check(&tcp_probe(format!("localhost:{port}"))).await;
        assert!(out.ok, "{out:?}");
        assert!(out.detail.contains(&format!(":{port}")), "{out:?}");

        let port = closed_port().await;
        let out = check(&tcp_probe(format!("127.0.0.1:{port}"))).await;
        assert!(!out.ok);
        assert!(out.detail.contains("refused"), "{out:?}");

        let out = check(&tcp_probe("no-such-host.invalid:80".into())).await;
        assert!(!out.ok, "{out:?}");
    }

    /// Serves one connection: checks the request head, then runs `answer`.
    async fn http_server<F, Fut>(answer: F) -> (u16, tokio::task::JoinHandle<String>)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                assert_eq!(
                    stream.read(&mut byte).await.expect("read request"),
                    1,
                    "request ended early"
                );
                head.push(byte[0]);
            }
            answer(stream).await;
            String::from_utf8(head).expect("utf-8 request")
        });
        (port, server)
    }

    async fn http_answering(answer: &'static [u8]) -> (ProbeOutcome, String) {
        let (port, server) = http_server(move |mut s| async move {
            let _ = s.write_all(answer).await;
        })
        .await;
        let out = check(&http_probe(
            format!("http://127.0.0.1:{port}/health?x=1"),
            PROMPTLY,
        ))
        .await;
        (out, server.await.expect("server"))
    }

    #[tokio::test]
    async fn http_200_passes_and_sends_a_proper_request() {
        let (out, request) = http_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(
            out,
            ProbeOutcome {
                ok: true,
                detail: "HTTP 200 OK".into()
            }
        );
        let lines: Vec<&str> = request.split("\r\n").collect();
        assert_eq!(lines[0], "GET /health?x=1 HTTP/1.1");
        assert!(
            lines.iter().any(|l| l.starts_with("Host: 127.0.0.1:")),
            "{request}"
        );
        assert!(lines.contains(&"Connection: close"), "{request}");
    }

    #[tokio::test]
    async fn http_redirect_passes_and_errors_fail() {
        let (out, _) = http_answering(b"HTTP/1.0 302 Found\r\nLocation: /x\r\n\r\n").await;
        assert!(out.ok, "{out:?}");
        let (out, _) = http_answering(b"HTTP/1.1 500 Internal Server Error\r\n\r\n").await;
        assert_eq!(
            out,
            ProbeOutcome {
                ok: false,
                detail: "HTTP 500 Internal Server Error".into()
            }
        );
        let (out, _) = http_answering(b"HTTP/1.1 404\r\n\r\n").await;
        assert_eq!(
            out,
            ProbeOutcome {
                ok: false,
                detail: "HTTP 404".into()
            }
        );
    }

    #[tokio::test]
    async fn http_garbage_fails() {
        let (out, _) = http_answering(b"SSH-2.0-OpenSSH_9.6\r\n").await;
        assert!(!out.ok);
        assert!(
            out.detail.starts_with("malformed status line `SSH-2.0"),
            "{out:?}"
        );
        let (out, _) = http_answering(b"HTTP/1.1 2000 OK\r\n").await;
        assert!(!out.ok && out.detail.contains("malformed"), "{out:?}");
        let (out, _) = http_answering(b"HTTP/1.1 200").await;
        assert_eq!(
            out,
            ProbeOutcome {
                ok: false,
                detail: "connection closed before a status line".into()
            }
        );
        let (out, _) = http_answering(b"").await;
        assert!(!out.ok, "{out:?}");
    }

    #[tokio::test]
    async fn http_never_answering_fails_within_the_timeout() {
        let (port, server) = http_server(|mut s| async move {
            // Keep the connection open and silent until the probe hangs up.
            let _ = s.read(&mut [0u8; 1]).await;
        })
        .await;
        let started = Instant::now();
        let out = check(&http_probe(format!("http://127.0.0.1:{port}/"), SHORT)).await;
        let took = started.elapsed();
        assert_eq!(
            out,
            ProbeOutcome {
                ok: false,
                detail: "timed out after 200ms".into()
            }
        );
        assert!(took >= SHORT && took < PROMPTLY, "{took:?}");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn http_endless_answer_is_cut_off() {
        let (port, server) = http_server(|mut s| async move {
            let chunk = [b'A'; 4096];
            // Sends until the probe hangs up; the probe must not read all of it.
            while s.write_all(&chunk).await.is_ok() {}
        })
        .await;
        let out = check(&http_probe(format!("http://127.0.0.1:{port}/"), PROMPTLY)).await;
        assert_eq!(
            out,
            ProbeOutcome {
                ok: false,
                detail: "no status line within the first 8192 bytes".into()
            }
        );
        server.await.expect("server");
    }

    #[tokio::test]
    async fn http_connection_refused_fails() {
        let port = closed_port().await;
        let out = check(&http_probe(format!("http://127.0.0.1:{port}/"), SHORT)).await;
        assert!(!out.ok && out.detail.contains("refused"), "{out:?}");
    }

    #[tokio::test]
    async fn exec_passes_on_exit_0_and_fails_otherwise() {
        assert_eq!(
            check(&exec_probe(&["true"], PROMPTLY)).await,
            ProbeOutcome {
                ok: true,
                detail: "exit code 0".into()
            }
        );
        assert_eq!(
            check(&exec_probe(&["false"], PROMPTLY)).await,
            ProbeOutcome {
                ok: false,
                detail: "command ended with exit code 1".into()
            }
        );
        assert_eq!(
            check(&exec_probe(&["sh", "-c", "kill -9 $$"], PROMPTLY)).await,
            ProbeOutcome {
                ok: false,
                detail: "command ended with signal 9".into()
            }
        );
        let out = check(&exec_probe(&["/nonexistent/probe"], PROMPTLY)).await;
        assert!(
            !out.ok && out.detail.starts_with("cannot run `/nonexistent/probe`"),
            "{out:?}"
        );
    }

    fn pid_in(file: &Path) -> u32 {
        std::fs::read_to_string(file)
            .expect("pid file")
            .trim()
            .parse()
            .expect("a pid")
    }

    /// Gone, or a zombie waiting for a reaper that is not us (an orphan belongs to init).
    fn is_dead(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        }
    }

    #[tokio::test]
    async fn exec_timeout_kills_the_group_and_reaps_the_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let leader = dir.path().join("leader");
        let background = dir.path().join("background");
        let script = format!(
            "sleep 10 & echo $! > {bg}.tmp && mv {bg}.tmp {bg}; echo $$ > {l}.tmp && mv {l}.tmp {l}; exec sleep 10",
            bg = background.display(),
            l = leader.display()
        );
        let started = Instant::now();
        let out = check(&exec_probe(&["sh", "-c", &script], SHORT)).await;
        let took = started.elapsed();
        assert_eq!(
            out,
            ProbeOutcome {
                ok: false,
                detail: "timed out after 200ms".into()
            }
        );
        assert!(took >= SHORT && took < PROMPTLY, "{took:?}");

        // The command itself was reaped by the probe: no zombie of ours is left.
        let leader = pid_in(&leader);
        assert!(
            !Path::new(&format!("/proc/{leader}")).exists(),
            "probe command {leader} still exists"
        );
        // Its background child, in the same group, was killed too.
        let background = pid_in(&background);
        let deadline = Instant::now() + PROMPTLY;
        while !is_dead(background) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            is_dead(background),
            "background process {background} survived the group kill"
        );
    }

    #[tokio::test]
    async fn exec_sleep_is_cut_off_at_the_timeout() {
        let started = Instant::now();
        let out = check(&exec_probe(&["sleep", "10"], SHORT)).await;
        let took = started.elapsed();
        assert!(!out.ok, "{out:?}");
        assert!(took >= SHORT && took < PROMPTLY, "{took:?}");
    }

    #[tokio::test]
    async fn a_probe_without_its_target_fails() {
        for kind in [ProbeKind::Tcp, ProbeKind::Http, ProbeKind::Exec] {
            let out = check(&probe(kind, SHORT)).await;
            assert!(
                !out.ok && out.detail.starts_with("no `"),
                "{kind:?}: {out:?}"
            );
        }
        let out = check(&exec_probe(&[], SHORT)).await;
        assert!(!out.ok, "{out:?}");
    }

    #[test]
    fn http_urls() {
        let ok = |url: &str| parse_http_url(url).unwrap_or_else(|| panic!("{url} should parse"));
        assert_eq!(
            ok("http://127.0.0.1:8080/health"),
            ("127.0.0.1".into(), 8080, "/health".into())
        );
        assert_eq!(
            ok("http://example.com"),
            ("example.com".into(), 80, "/".into())
        );
        assert_eq!(
            ok("http://example.com/a/b?c=d"),
            ("example.com".into(), 80, "/a/b?c=d".into())
        );
        assert_eq!(ok("http://[::1]:9000/x"), ("::1".into(), 9000, "/x".into()));
        assert_eq!(ok("http://[fe80::1]/"), ("fe80::1".into(), 80, "/".into()));
        for bad in [
            "https://example.com/",
            "ftp://x",
            "http://",
            "http:///path",
            "http://:80/",
            "http://h:notaport/",
            "http://h:/",
            "http://h:99999/",
            "http://h:0/",
            "http://h:+80/",
            "http://h/a b",
            "http://h\r\nX-Evil: 1/",
            "http://h/\r\nX-Evil: 1",
            "http://[::1/",
            "http://[::1]x/",
            "http://[host]/",
            "http://::1/",
            "http://a:b:c/",
            "http://user@h/",
        ] {
            assert_eq!(parse_http_url(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status_line(b"HTTP/1.1 204 No Content\r").expect("valid"),
            (204, " No Content".into())
        );
        assert_eq!(
            parse_status_line(b"HTTP/1.0 301").expect("valid"),
            (301, String::new())
        );
        for bad in [
            &b"HTTP/1.1 20 OK"[..],
            b"HTTP/1.1 abc OK",
            b"HTTP/x.1 200 OK",
            b"HTTP/1.1  200 OK",
            b"200 OK",
            b"\xff\xfe",
            b"HTTP/1.1 999 X",
        ] {
            assert!(
                parse_status_line(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
