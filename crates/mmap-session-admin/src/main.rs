//! `mmap-session-admin`: look after a session store file, safely while the servers run.
//!
//! ```text
//! mmap-session-admin --store /var/lib/app/sessions stats
//! mmap-session-admin --store /var/lib/app/sessions verify          # exit code 1 on any problem
//! mmap-session-admin --store /var/lib/app/sessions list
//! mmap-session-admin --store /var/lib/app/sessions purge-expired
//! mmap-session-admin --store /var/lib/app/sessions remove <cookie value>
//! mmap-session-admin hash <cookie value>                            # the session's name in logs
//! ```
//!
//! The tool opens the file like one more server process does (it never creates one): reads are
//! lock-free, a removal takes the session's lease like a request would.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use clap::{Parser, Subcommand};
use mmap_session::SessionId;
use mmap_session_store::{Store, StoreError};

#[derive(Parser, Debug)]
#[command(version, about = "Operator tool for mmap-session store files")]
struct Cli {
    /// The store file (the `--store` path the servers use).
    #[arg(long, global = true)]
    store: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Counters: records, bytes, capacity, evictions, lease waits, take-overs, checksum failures.
    Stats,
    /// Walk the whole file; print every inconsistency; exit 1 if there is any.
    Verify,
    /// One line per session: hash, size, expiry, lease holder. Never shows ids.
    List,
    /// Remove every expired session that is not in use now.
    PurgeExpired,
    /// Remove the session of a cookie value (as the browser holds it, signed or not).
    Remove {
        /// The cookie's value.
        cookie: String,
        /// How long to wait if a request is using the session, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        wait_ms: u64,
    },
    /// Print the short hash under which the session of a cookie value appears in logs and lists.
    Hash {
        /// The cookie's value.
        cookie: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("mmap-session-admin: {message}");
            ExitCode::from(2)
        }
    }
}

/// The session id in a cookie value: the id itself, or `id.signature` when cookies are signed.
/// The signature is not checked: whoever can open the store file needs no cookie to act on it.
fn id_of(cookie: &str) -> Result<SessionId, String> {
    let id_text = cookie.split_once('.').map_or(cookie, |(id, _)| id);
    SessionId::decode(id_text.trim()).ok_or_else(|| "that is not a session cookie value".to_owned())
}

fn open(store: Option<PathBuf>) -> Result<Store, String> {
    let path = store.ok_or("--store <PATH> is required for this command")?;
    if !path.exists() {
        // Opening creates a store; an operator tool must not conjure one from a typo.
        return Err(format!("{}: no such store file", path.display()));
    }
    Store::open(&path).map_err(|e| e.to_string())
}

fn age(t: SystemTime) -> String {
    match t.duration_since(SystemTime::now()) {
        Ok(ahead) => format!("in {}s", ahead.as_secs()),
        Err(e) => format!("{}s ago", e.duration().as_secs()),
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Hash { cookie } => {
            println!("{}", id_of(&cookie)?.short_hash());
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats => {
            let s = open(cli.store)?.stats();
            println!("records            {}", s.live_records);
            println!("bytes used         {}", s.bytes_used);
            println!("bytes reserved     {}", s.bytes_reserved);
            println!("capacity bytes     {}", s.capacity_bytes);
            println!("index entries      {}", s.index_entries);
            println!("max value bytes    {}", s.max_value_len);
            println!("processes          {}", s.processes);
            println!("evictions          {}", s.evictions);
            println!("expired reclaimed  {}", s.expired_reclaimed);
            println!("lease waits        {}", s.lease_waits);
            println!("take-overs         {}", s.takeovers);
            println!("checksum failures  {}", s.checksum_failures);
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify => {
            let report = open(cli.store)?.verify();
            for problem in &report.problems {
                println!("problem: {problem}");
            }
            println!(
                "{} records ({} expired), {} leased ({} by dead processes), {} free blocks, \
                 {} leaked blocks ({} bytes)",
                report.records,
                report.expired_records,
                report.leased,
                report.dead_holder_leases,
                report.free_blocks,
                report.leaked_blocks,
                report.leaked_bytes
            );
            if report.is_clean() {
                println!("clean");
                Ok(ExitCode::SUCCESS)
            } else {
                println!("{} problem(s)", report.problems.len());
                Ok(ExitCode::from(1))
            }
        }
        Command::List => {
            let entries = open(cli.store)?.entries();
            println!(
                "{:<8}  {:>7}  {:>7}  {:<14}  {:<14}  lease",
                "hash", "bytes", "block", "expires", "last used"
            );
            for e in &entries {
                let lease = match &e.lease {
                    None => "-".to_owned(),
                    Some(h) if h.alive => format!("pid {}", h.pid),
                    Some(h) => format!("pid {} (dead)", h.pid),
                };
                println!(
                    "{:<8}  {:>7}  {:>7}  {:<14}  {:<14}  {lease}",
                    e.key_hash,
                    e.value_len,
                    e.block_len,
                    age(e.expires_at),
                    age(e.last_used)
                );
            }
            println!("{} session(s)", entries.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::PurgeExpired => {
            let removed = open(cli.store)?.purge_expired();
            println!("removed {removed} expired session(s)");
            Ok(ExitCode::SUCCESS)
        }
        Command::Remove { cookie, wait_ms } => {
            let id = id_of(&cookie)?;
            let store = open(cli.store)?;
            let deadline = Instant::now() + Duration::from_millis(wait_ms);
            let mut lease = match store.lease_blocking(id.as_bytes(), deadline) {
                Ok(lease) => lease,
                Err(StoreError::LeaseTimeout) => {
                    return Err(format!(
                        "session {} stayed in use; try again",
                        id.short_hash()
                    ))
                }
                Err(e) => return Err(e.to_string()),
            };
            if lease.read().is_none() {
                println!("no session {}", id.short_hash());
                return Ok(ExitCode::from(1));
            }
            lease.remove().map_err(|e| e.to_string())?;
            println!("removed session {}", id.short_hash());
            Ok(ExitCode::SUCCESS)
        }
    }
}
