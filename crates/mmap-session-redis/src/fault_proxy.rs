//! A fault-injecting TCP proxy for tests (feature `test-server`): it sits between a client and a
//! real `redis-server`, reads the RESP commands and replies that pass, and does to the commands a
//! test names what a bad network does: loses a reply, holds a command back, cuts a connection
//! before or after a command, stops answering, refuses connections.
//!
//! Commands are matched by their arguments (for a script: the SHA-1 that `EVALSHA` sends, see
//! [`crate::test_server::script_sha1`]). Each rule acts on as many matching commands as it is
//! told, and counts what it did, so that a test waits for the fault to have happened instead of
//! sleeping.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

/// What a rule does to a matching command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Forwards the command, waits for the server's reply (so the command has run), throws the
    /// reply away and cuts the client's connection: the client never learns that it ran.
    DropReply,
    /// Cuts the client's connection instead of forwarding the command: it never runs.
    CutBefore,
    /// Forwards the command and cuts the connection at once, before the server's reply: the
    /// connection breaks while the command is in flight.
    CutAfter,
    /// Holds the command (and everything after it on its connection) until
    /// [`RuleHandle::open`]; other connections go on. Complete when its reply has passed.
    Hold,
    /// Changes nothing; counts the replies that passed (see [`RuleHandle::completed`]).
    Observe,
}

/// How the proxy treats new and existing connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Forwards to the upstream server.
    Forward,
    /// Accepts connections and closes them at once (a server that is down behind a balancer).
    Refuse,
    /// Accepts connections and bytes and never answers (a host that stopped answering).
    Blackhole,
}

type Matcher = Box<dyn Fn(&[Vec<u8>]) -> bool + Send + Sync>;

struct RuleState {
    matcher: Matcher,
    fault: Fault,
    /// How many more commands the rule acts on.
    remaining: AtomicUsize,
    /// How many commands it has matched so far.
    matched: watch::Sender<usize>,
    /// How many of its faults are complete (reply dropped, connection cut, or reply passed).
    completed: watch::Sender<usize>,
    /// Opened by the test: held commands go on.
    open: watch::Sender<bool>,
}

/// A test's handle on one rule of a [`FaultProxy`].
#[derive(Clone)]
pub struct RuleHandle(Arc<RuleState>);

impl std::fmt::Debug for RuleHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleHandle")
            .field("fault", &self.0.fault)
            .field("matched", &*self.0.matched.borrow())
            .field("completed", &*self.0.completed.borrow())
            .finish()
    }
}

impl RuleHandle {
    /// Waits until `n` commands have matched the rule (and, for [`Fault::Hold`], are held).
    pub async fn matched(&self, n: usize) {
        let mut seen = self.0.matched.subscribe();
        let _ = seen.wait_for(|count| *count >= n).await;
    }

    /// Waits until the rule's fault has been done `n` times: the reply dropped and the connection
    /// cut, the connection cut, or the reply of a held or observed command passed.
    pub async fn completed(&self, n: usize) {
        let mut seen = self.0.completed.subscribe();
        let _ = seen.wait_for(|count| *count >= n).await;
    }

    /// How many commands have matched so far.
    pub fn matched_count(&self) -> usize {
        *self.0.matched.borrow()
    }

    /// Lets held commands go on, and every later match pass without being held.
    pub fn open(&self) {
        self.0.open.send_replace(true);
    }

    /// Stops the rule: later commands pass untouched.
    pub fn disarm(&self) {
        self.0.remaining.store(0, Ordering::SeqCst);
    }
}

struct Shared {
    upstream_port: AtomicU16,
    mode: AtomicU8,
    rules: Mutex<Vec<Arc<RuleState>>>,
    connections: Mutex<Vec<AbortHandle>>,
}

impl Shared {
    fn mode(&self) -> Mode {
        match self.mode.load(Ordering::SeqCst) {
            0 => Mode::Forward,
            1 => Mode::Refuse,
            _ => Mode::Blackhole,
        }
    }

    /// The first armed rule that matches `command`, taking one of its uses.
    fn rule_for(&self, command: &[Vec<u8>]) -> Option<Arc<RuleState>> {
        let rules = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
        for rule in rules.iter() {
            if !(rule.matcher)(command) {
                continue;
            }
            let took = rule
                .remaining
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                    left.checked_sub(1)
                })
                .is_ok();
            if took {
                rule.matched.send_modify(|count| *count += 1);
                return Some(Arc::clone(rule));
            }
        }
        None
    }

    fn cut_all(&self) {
        let connections = std::mem::take(
            &mut *self
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for connection in connections {
            connection.abort();
        }
    }
}

/// A TCP proxy on a free port of 127.0.0.1 in front of a Redis server, stopped (with every
/// connection through it) when dropped. It needs a tokio runtime with I/O enabled.
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
    accept: AbortHandle,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("port", &self.port)
            .field(
                "upstream_port",
                &self.shared.upstream_port.load(Ordering::SeqCst),
            )
            .field("mode", &self.shared.mode())
            .finish_non_exhaustive()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.cut_all();
    }
}

impl FaultProxy {
    /// Starts a proxy to the server on `127.0.0.1:upstream_port`.
    ///
    /// # Errors
    ///
    /// If no local port can be bound.
    pub async fn start(upstream_port: u16) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            upstream_port: AtomicU16::new(upstream_port),
            mode: AtomicU8::new(0),
            rules: Mutex::new(Vec::new()),
            connections: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared))).abort_handle();
        Ok(Self {
            port,
            shared,
            accept,
        })
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`: the URL to give the client instead of the server's.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Adds a rule acting on the next `times` commands `matches` accepts (its arguments, the
    /// command's name first). Rules are tried in the order they were added.
    pub fn add_rule(
        &self,
        fault: Fault,
        times: usize,
        matches: impl Fn(&[Vec<u8>]) -> bool + Send + Sync + 'static,
    ) -> RuleHandle {
        let rule = Arc::new(RuleState {
            matcher: Box::new(matches),
            fault,
            remaining: AtomicUsize::new(times),
            matched: watch::Sender::new(0),
            completed: watch::Sender::new(0),
            open: watch::Sender::new(false),
        });
        self.shared
            .rules
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&rule));
        RuleHandle(rule)
    }

    /// A rule on `EVALSHA` of the script with SHA-1 `sha1` (hex).
    pub fn on_script(&self, fault: Fault, times: usize, sha1: &str) -> RuleHandle {
        let sha1 = sha1.to_ascii_lowercase().into_bytes();
        self.add_rule(fault, times, move |command| {
            matches!(command, [name, sha, ..]
                if name.eq_ignore_ascii_case(b"EVALSHA") && sha.eq_ignore_ascii_case(&sha1))
        })
    }

    /// Sends new connections to the server on `127.0.0.1:port` (a restarted server); existing
    /// connections stay where they are.
    pub fn set_upstream(&self, port: u16) {
        self.shared.upstream_port.store(port, Ordering::SeqCst);
    }

    /// Changes how new connections are treated; [`Mode::Refuse`] and [`Mode::Blackhole`] also cut
    /// every existing connection, as a server going away does.
    pub fn set_mode(&self, mode: Mode) {
        let value = match mode {
            Mode::Forward => 0,
            Mode::Refuse => 1,
            Mode::Blackhole => 2,
        };
        self.shared.mode.store(value, Ordering::SeqCst);
        if mode != Mode::Forward {
            self.shared.cut_all();
        }
    }

    /// Cuts every connection through the proxy now.
    pub fn cut_all(&self) {
        self.shared.cut_all();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let mode = shared.mode();
        if mode == Mode::Refuse {
            drop(client);
            continue;
        }
        let task = tokio::spawn(connection(client, Arc::clone(&shared), mode));
        let mut connections = shared
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        connections.retain(|task| !task.is_finished());
        connections.push(task.abort_handle());
    }
}

/// One client connection: forwards both ways until either side closes or a fault cuts it.
async fn connection(client: TcpStream, shared: Arc<Shared>, mode: Mode) {
    if mode == Mode::Blackhole {
        // Read and drop everything, answer nothing.
        let mut client = client;
        let mut buffer = [0u8; 4096];
        while matches!(client.read(&mut buffer).await, Ok(n) if n > 0) {}
        return;
    }
    let port = shared.upstream_port.load(Ordering::SeqCst);
    let Ok(server) = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // What to do with each reply, in command order.
    let (pending_tx, pending_rx) = mpsc::unbounded_channel();
    // Either direction ending ends the connection: the other half is dropped with this future.
    tokio::select! {
        () = commands(client_read, server_write, shared, pending_tx) => {}
        () = replies(server_read, client_write, pending_rx) => {}
    }
}

/// What the reply to one forwarded command gets.
struct Pending {
    rule: Option<Arc<RuleState>>,
}

async fn commands(
    mut client: OwnedReadHalf,
    mut server: OwnedWriteHalf,
    shared: Arc<Shared>,
    pending: mpsc::UnboundedSender<Pending>,
) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        // Every whole command in the buffer, one at a time.
        while let Some((len, args)) = parse_command(&buffer) {
            let bytes: Vec<u8> = buffer.drain(..len).collect();
            let rule = shared.rule_for(&args);
            match rule.as_ref().map(|rule| rule.fault) {
                Some(Fault::CutBefore) => {
                    if let Some(rule) = &rule {
                        rule.completed.send_modify(|count| *count += 1);
                    }
                    return;
                }
                Some(Fault::Hold) => {
                    if let Some(rule) = &rule {
                        let mut open = rule.open.subscribe();
                        let _ = open.wait_for(|open| *open).await;
                    }
                }
                _ => {}
            }
            let cut_after = matches!(rule.as_ref().map(|rule| rule.fault), Some(Fault::CutAfter));
            // Registered before the command is sent, so its reply always finds it.
            if pending.send(Pending { rule: rule.clone() }).is_err() {
                return;
            }
            if server.write_all(&bytes).await.is_err() {
                return;
            }
            if cut_after {
                if let Some(rule) = &rule {
                    rule.completed.send_modify(|count| *count += 1);
                }
                return;
            }
        }
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn replies(
    mut server: OwnedReadHalf,
    mut client: OwnedWriteHalf,
    mut pending: mpsc::UnboundedReceiver<Pending>,
) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        while let Some(len) = value_len(&buffer, 0) {
            let bytes: Vec<u8> = buffer.drain(..len).collect();
            // Pub/sub messages answer no command.
            let owner = if is_push(&bytes) {
                None
            } else {
                pending.try_recv().ok()
            };
            if let Some(Pending { rule: Some(rule) }) = owner {
                if rule.fault == Fault::DropReply {
                    rule.completed.send_modify(|count| *count += 1);
                    return;
                }
                if client.write_all(&bytes).await.is_err() {
                    return;
                }
                if matches!(rule.fault, Fault::Observe | Fault::Hold) {
                    rule.completed.send_modify(|count| *count += 1);
                }
                continue;
            }
            if client.write_all(&bytes).await.is_err() {
                return;
            }
        }
        match server.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// One line ending in CRLF from `at`: its text and where the next item starts.
fn line(buffer: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = buffer.get(at..)?;
    let end = rest.windows(2).position(|pair| pair == b"\r\n")?;
    Some((&rest[..end], at + end + 2))
}

fn number(text: &[u8]) -> Option<i64> {
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// A whole command (`*N` of bulk strings) at the start of `buffer`: its length and arguments.
fn parse_command(buffer: &[u8]) -> Option<(usize, Vec<Vec<u8>>)> {
    if buffer.is_empty() {
        return None;
    }
    if buffer[0] != b'*' {
        // An inline command: one line.
        let (text, next) = line(buffer, 0)?;
        let args = text
            .split(|byte| *byte == b' ')
            .filter(|arg| !arg.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        return Some((next, args));
    }
    let (count, mut at) = line(buffer, 1)?;
    let count = usize::try_from(number(count)?).unwrap_or(0);
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        if buffer.get(at) != Some(&b'$') {
            return None;
        }
        let (len, start) = line(buffer, at + 1)?;
        let len = usize::try_from(number(len)?).ok()?;
        let end = start + len;
        if buffer.len() < end + 2 {
            return None;
        }
        args.push(buffer[start..end].to_vec());
        at = end + 2;
    }
    Some((at, args))
}

/// The length of the whole RESP2/RESP3 value at `at`, if it is all in `buffer`.
fn value_len(buffer: &[u8], at: usize) -> Option<usize> {
    value_end(buffer, at).map(|end| end - at)
}

fn value_end(buffer: &[u8], at: usize) -> Option<usize> {
    let kind = *buffer.get(at)?;
    let (head, next) = line(buffer, at + 1)?;
    match kind {
        b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => Some(next),
        b'$' | b'=' | b'!' => {
            let len = number(head)?;
            if len < 0 {
                return Some(next);
            }
            let end = next + usize::try_from(len).ok()? + 2;
            (buffer.len() >= end).then_some(end)
        }
        b'*' | b'~' | b'>' | b'%' => {
            let count = number(head)?;
            if count < 0 {
                return Some(next);
            }
            let items = usize::try_from(count).ok()? * if kind == b'%' { 2 } else { 1 };
            let mut end = next;
            for _ in 0..items {
                end = value_end(buffer, end)?;
            }
            Some(end)
        }
        // Not RESP: pass whatever there is as one value.
        _ => Some(next),
    }
}

/// Whether a whole reply is a pub/sub message rather than the answer to a command.
fn is_push(reply: &[u8]) -> bool {
    if reply.first() == Some(&b'>') {
        return true;
    }
    if reply.first() != Some(&b'*') {
        return false;
    }
    let Some((_, first)) = line(reply, 1) else {
        return false;
    };
    let Some((_, start)) = line(reply, first + 1) else {
        return false;
    };
    let Some((kind, _)) = line(reply, start) else {
        return false;
    };
    matches!(kind, b"message" | b"pmessage" | b"smessage")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_replies_are_split_whole() {
        let two = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n";
        let (len, args) = parse_command(two).unwrap();
        assert_eq!(args, vec![b"GET".to_vec(), b"k".to_vec()]);
        let (rest, ping) = parse_command(&two[len..]).unwrap();
        assert_eq!(ping, vec![b"PING".to_vec()]);
        assert_eq!(len + rest, two.len());
        assert!(parse_command(&two[..len - 1]).is_none());

        let reply = b"*3\r\n:1\r\n$-1\r\n*2\r\n$1\r\na\r\n+OK\r\n";
        assert_eq!(value_len(reply, 0), Some(reply.len()));
        assert_eq!(value_len(&reply[..reply.len() - 1], 0), None);
        assert!(is_push(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n"));
        assert!(!is_push(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n"));
    }
}
