//! kvclient: writes to and checks the `kv` example server.
//!
//! - `write --count N --acked FILE [--deadline SECS]`: sets keys `k0`..`k<N-1>` to values
//!   derived from the key (`kvproto::value_for`), one at a time; appends each key to FILE
//!   (fsync'd) only after the server answered `OK`. A broken connection or an `ERR` is retried
//!   (reconnecting with a short backoff) until the write has waited SECS (default 30): this is
//!   how it rides through a restart or a failover. SET is idempotent, so re-sending a write
//!   whose answer was lost is harmless.
//! - `verify --acked FILE`: every key in FILE is present with its value: exit 0; otherwise it
//!   prints what is missing or wrong and exits 1.
//! - `wait-up [--timeout SECS]`: polls `PING` until the answer is `PONG primary`; prints the
//!   milliseconds that took.
//!
//! Exit status: 0 success, 1 a valid negative answer (missing keys, deadline passed), 2 error.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ftkit_examples::kvproto::{LineRead, MAX_LINE, Reply, Role, key_name, read_line, value_for};

/// Default of `write --deadline`.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);
/// Default of `wait-up --timeout`.
const DEFAULT_WAIT_UP: Duration = Duration::from_secs(30);
/// First pause before a retry; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
/// Longest pause between retries: short, so a failover is noticed soon after it completes.
const MAX_BACKOFF: Duration = Duration::from_millis(200);
/// `wait-up` polls this often.
const WAIT_UP_POLL: Duration = Duration::from_millis(10);
/// How long a connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one answer may take (a sync-mode write waits up to 10 s for the backups).
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// Exit status: a valid negative answer.
const EXIT_NEGATIVE: u8 = 1;
/// Exit status: an error.
const EXIT_ERROR: u8 = 2;

const USAGE: &str = "usage: kvclient --addr ADDR write --count N --acked FILE [--deadline SECS]
       kvclient --addr ADDR verify --acked FILE
       kvclient --addr ADDR wait-up [--timeout SECS]";

/// A failure: what to print and the exit status.
#[derive(Debug)]
struct Failure {
    status: u8,
    message: String,
}

fn error(message: impl Into<String>) -> Failure {
    Failure {
        status: EXIT_ERROR,
        message: message.into(),
    }
}

fn negative(message: impl Into<String>) -> Failure {
    Failure {
        status: EXIT_NEGATIVE,
        message: message.into(),
    }
}

#[derive(Debug)]
enum Command {
    Write {
        count: u64,
        acked: PathBuf,
        deadline: Duration,
    },
    Verify {
        acked: PathBuf,
    },
    WaitUp {
        timeout: Duration,
    },
}

fn secs(flag: &str, value: &str) -> Result<Duration, Failure> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| error(format!("{flag}: {value:?} is not a number of seconds")))
}

fn parse(args: &[String]) -> Result<(Vec<SocketAddr>, Command), Failure> {
    let mut addr = None;
    let mut verb = None;
    let mut count = None;
    let mut acked = None;
    let mut deadline = DEFAULT_DEADLINE;
    let mut timeout = DEFAULT_WAIT_UP;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if !arg.starts_with("--") {
            if verb.replace(arg.clone()).is_some() {
                return Err(error(format!("unexpected argument {arg:?}")));
            }
            continue;
        }
        if arg == "--help" {
            return Err(error(""));
        }
        let value = it
            .next()
            .ok_or_else(|| error(format!("{arg} needs a value")))?;
        match arg.as_str() {
            "--addr" => {
                let resolved: Vec<SocketAddr> = value
                    .to_socket_addrs()
                    .map_err(|e| error(format!("--addr {value:?}: {e}")))?
                    .collect();
                addr = Some(resolved);
            }
            "--count" => {
                count = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| error(format!("--count {value:?} is not a number")))?,
                );
            }
            "--acked" => acked = Some(PathBuf::from(value)),
            "--deadline" => deadline = secs(arg, value)?,
            "--timeout" => timeout = secs(arg, value)?,
            _ => return Err(error(format!("unknown option {arg}"))),
        }
    }
    let addr = addr
        .filter(|a| !a.is_empty())
        .ok_or_else(|| error("--addr is required"))?;
    let need_acked = |acked: Option<PathBuf>| acked.ok_or_else(|| error("--acked is required"));
    let command = match verb.as_deref() {
        Some("write") => Command::Write {
            count: count.ok_or_else(|| error("write needs --count"))?,
            acked: need_acked(acked)?,
            deadline,
        },
        Some("verify") => Command::Verify {
            acked: need_acked(acked)?,
        },
        Some("wait-up") => Command::WaitUp { timeout },
        Some(other) => return Err(error(format!("unknown command {other:?}"))),
        None => return Err(error("a command is required")),
    };
    Ok((addr, command))
}

/// One connection to the server.
#[derive(Debug)]
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    line: Vec<u8>,
}

impl Conn {
    fn open(addrs: &[SocketAddr]) -> std::io::Result<Conn> {
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(REPLY_TIMEOUT))?;
                    return Ok(Conn {
                        reader: BufReader::new(s.try_clone()?),
                        writer: s,
                        line: Vec::new(),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::ErrorKind::AddrNotAvailable.into()))
    }

    /// Sends one request line and reads its reply.
    fn call(&mut self, request: &str) -> std::io::Result<Reply> {
        self.writer.write_all(format!("{request}\n").as_bytes())?;
        match read_line(&mut self.reader, &mut self.line, MAX_LINE)? {
            LineRead::Line => Reply::parse(&self.line).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "not a reply: {:?}",
                        String::from_utf8_lossy(&self.line[..self.line.len().min(80)])
                    ),
                )
            }),
            LineRead::TooLong => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the reply is too long",
            )),
            LineRead::Eof => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// Doubles a backoff up to [`MAX_BACKOFF`].
fn next_backoff(b: Duration) -> Duration {
    (b * 2).min(MAX_BACKOFF)
}

fn write(
    addrs: &[SocketAddr],
    count: u64,
    acked: &Path,
    deadline: Duration,
) -> Result<(), Failure> {
    let mut out = File::options()
        .create(true)
        .append(true)
        .open(acked)
        .map_err(|e| error(format!("cannot open {}: {e}", acked.display())))?;
    let started = Instant::now();
    let mut conn: Option<Conn> = None;
    let mut retries = 0u64;
    let mut longest_wait = Duration::ZERO;
    for i in 0..count {
        let key = key_name(i);
        let request = format!("SET {key} {}", value_for(&key));
        let first_try = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        loop {
            let answer = match conn.as_mut() {
                Some(c) => c.call(&request).map_err(|e| e.to_string()),
                None => Conn::open(addrs)
                    .map_err(|e| format!("connect: {e}"))
                    .and_then(|mut c| {
                        let r = c.call(&request).map_err(|e| e.to_string());
                        conn = Some(c);
                        r
                    }),
            };
            let last_problem = match answer {
                Ok(Reply::Ok(_)) => break,
                Ok(Reply::Err(why)) => format!("ERR {why}"),
                Ok(other) => {
                    return Err(error(format!("SET {key}: unexpected reply {other:?}")));
                }
                Err(e) => {
                    // The connection is unusable: the reply may have been lost with it.
                    conn = None;
                    e
                }
            };
            retries += 1;
            if first_try.elapsed() >= deadline {
                return Err(negative(format!(
                    "SET {key} not acknowledged within {} s (last: {last_problem}); {i} writes \
                     acknowledged",
                    deadline.as_secs_f64()
                )));
            }
            std::thread::sleep(backoff);
            backoff = next_backoff(backoff);
        }
        longest_wait = longest_wait.max(first_try.elapsed());
        // Acknowledged: record it durably before the next write.
        out.write_all(format!("{key}\n").as_bytes())
            .and_then(|()| out.sync_data())
            .map_err(|e| error(format!("cannot record {key} in {}: {e}", acked.display())))?;
    }
    println!(
        "acked {count} writes in {} ms ({retries} retries, longest wait {} ms)",
        started.elapsed().as_millis(),
        longest_wait.as_millis()
    );
    Ok(())
}

fn verify(addrs: &[SocketAddr], acked: &Path) -> Result<(), Failure> {
    let file =
        File::open(acked).map_err(|e| error(format!("cannot open {}: {e}", acked.display())))?;
    let mut conn = Conn::open(addrs).map_err(|e| error(format!("connect: {e}")))?;
    let (mut checked, mut bad) = (0u64, 0u64);
    for line in BufReader::new(file).lines() {
        let key = line.map_err(|e| error(format!("reading {}: {e}", acked.display())))?;
        let key = key.trim();
        if key.is_empty() {
            continue;
        }
        let want = value_for(key);
        let got = conn
            .call(&format!("GET {key}"))
            .map_err(|e| error(format!("GET {key}: {e}")))?;
        checked += 1;
        match got {
            Reply::Value(v) if v == want.as_bytes() => {}
            Reply::Value(v) => {
                bad += 1;
                println!(
                    "wrong {key}: {:?} instead of {want:?}",
                    String::from_utf8_lossy(&v)
                );
            }
            Reply::None => {
                bad += 1;
                println!("missing {key}");
            }
            Reply::Err(why) => return Err(error(format!("GET {key}: ERR {why}"))),
            other => return Err(error(format!("GET {key}: unexpected reply {other:?}"))),
        }
    }
    if bad > 0 {
        return Err(negative(format!(
            "{bad} of {checked} acknowledged keys missing or wrong"
        )));
    }
    println!("all {checked} acknowledged keys present");
    Ok(())
}

fn wait_up(addrs: &[SocketAddr], timeout: Duration) -> Result<(), Failure> {
    let started = Instant::now();
    loop {
        let last = match Conn::open(addrs).and_then(|mut c| c.call("PING")) {
            Ok(Reply::Pong(Role::Primary)) => {
                println!("{}", started.elapsed().as_millis());
                return Ok(());
            }
            Ok(other) => format!("{other:?}"),
            Err(e) => e.to_string(),
        };
        if started.elapsed() >= timeout {
            return Err(negative(format!(
                "no primary within {} s (last: {last})",
                timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(WAIT_UP_POLL);
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addrs, command) = match parse(&args) {
        Ok(p) => p,
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("kvclient: {}", f.message);
            }
            eprintln!("{USAGE}");
            return ExitCode::from(f.status);
        }
    };
    let result = match command {
        Command::Write {
            count,
            acked,
            deadline,
        } => write(&addrs, count, &acked, deadline),
        Command::Verify { acked } => verify(&addrs, &acked),
        Command::WaitUp { timeout } => wait_up(&addrs, timeout),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("kvclient: {}", f.message);
            ExitCode::from(f.status)
        }
    }
}
