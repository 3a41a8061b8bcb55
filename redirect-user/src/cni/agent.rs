//! `redirect-cni` commands done by the warm node agent (`redirect node run
//! --cni-socket PATH`). A CNI plugin is a process per command, and most of
//! a node-set ADD is that process's first touch of its own code and of the
//! kernel's interfaces; the agent has them warm. When the plugin's
//! configuration names the agent's socket, the plugin hands ADD, CHECK and
//! DEL to the agent and prints its answer; whenever the agent cannot be
//! asked or does not answer, the plugin does the command itself, as
//! without an agent. Every command is idempotent, so a command the agent
//! began before it died is finished or repaired by the plugin's own run.
//!
//! One request per connection: the plugin sends the invocation as JSON,
//! with the pod's network namespace as a descriptor (`SCM_RIGHTS`) on its
//! first byte, and shuts its side; the agent sends one JSON reply and
//! closes. The descriptor, not the path, names the namespace: a path like
//! `/proc/PID/ns/net` would name another process in the agent's PID
//! namespace. The agent answers only root (or its own user), and does each
//! request on a thread of its own that ends after it: entering the pod's
//! namespace changes that thread only.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read as _, Write as _},
    net::Shutdown,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::plugin::{CniError, Invocation, code};

/// The longest request or reply read (a configuration with a large
/// `prevResult` is a few KB).
const LIMIT: usize = 1 << 20;

/// How long the agent waits for a request once connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the plugin waits for the agent's answer before doing the
/// command itself (the agent's ADD may wait for the node set's lock
/// behind other pods').
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// What the plugin sends: its invocation, and whether to time it.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Request {
    command: String,
    container_id: String,
    /// `CNI_NETNS` as the runtime named it (for messages; the namespace
    /// itself is the descriptor). Empty for a DEL whose namespace is gone.
    netns: String,
    ifname: String,
    args: BTreeMap<String, String>,
    config: Value,
    timing: bool,
}

/// What the agent answers: the result or the error, and the timing lines
/// (`REDIRECT_TIMING`) of the command's phases in the agent.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Reply {
    result: Option<Value>,
    error: Option<WireError>,
    timing: String,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct WireError {
    code: u32,
    msg: String,
    details: String,
}

/// A command's outcome, as [`super::plugin::run`] returns it.
pub type Outcome = Result<Option<Value>, CniError>;

/// Asks the agent at `socket` to run `inv`: its outcome and timing lines,
/// or why it could not be asked or did not answer (the plugin then runs
/// the command itself).
pub fn ask(socket: &Path, inv: &Invocation, timing: bool) -> Result<(Outcome, String), String> {
    let netns = match inv.netns.as_str() {
        "" if inv.command == "DEL" => None,
        "" => return Err("CNI_NETNS is not set".into()),
        path => match File::open(path) {
            Ok(file) => Some(file),
            // A DEL for a pod whose namespace is gone: nothing to enter.
            Err(_) if inv.command == "DEL" => None,
            Err(err) => return Err(format!("opening {path}: {err}")),
        },
    };
    let request = Request {
        command: inv.command.clone(),
        container_id: inv.container_id.clone(),
        netns: if netns.is_some() {
            inv.netns.clone()
        } else {
            String::new()
        },
        ifname: inv.ifname.clone(),
        args: inv.args.clone(),
        config: inv.config.clone(),
        timing,
    };
    let body = serde_json::to_vec(&request).map_err(|err| err.to_string())?;
    crate::ebpf::timing::mark(|| "agent: request".into());
    let stream = UnixStream::connect(socket)
        .map_err(|err| format!("connecting to {}: {err}", socket.display()))?;
    crate::ebpf::timing::mark(|| "agent: connect".into());
    let exchange = || -> std::io::Result<Vec<u8>> {
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        let sent = send_with_fd(&stream, &body, netns.as_ref().map(|f| f.as_raw_fd()))?;
        (&stream).write_all(&body[sent..])?;
        stream.shutdown(Shutdown::Write)?;
        let mut text = Vec::new();
        (&stream).take(LIMIT as u64).read_to_end(&mut text)?;
        Ok(text)
    };
    let text =
        exchange().map_err(|err| format!("asking the agent at {}: {err}", socket.display()))?;
    crate::ebpf::timing::mark(|| "agent: the command, sent and answered".into());
    if text.is_empty() {
        return Err(format!(
            "the agent at {} closed without answering",
            socket.display()
        ));
    }
    let reply: Reply = serde_json::from_slice(&text)
        .map_err(|err| format!("the agent's answer is not a reply: {err}"))?;
    let outcome = match reply.error {
        Some(e) => Err(CniError::new(e.code, e.msg, e.details)),
        None => Ok(reply.result),
    };
    Ok((outcome, reply.timing))
}

/// The agent's socket at `path`, listening, readable and writable by its
/// owner only; its directory is made (mode 0700) if missing. A socket left
/// by an agent that is gone is replaced; one a live agent answers on is
/// refused.
pub fn bind(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _};

    use anyhow::{Context as _, bail};
    if !path.is_absolute() {
        bail!("--cni-socket {} is not an absolute path", path.display());
    }
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("making {} for --cni-socket", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("--cni-socket {}", path.display())),
        Ok(meta) if !meta.file_type().is_socket() => bail!(
            "--cni-socket {} exists and is not a socket: remove it or pass another path",
            path.display()
        ),
        Ok(_) if UnixStream::connect(path).is_ok() => bail!(
            "another node agent serves {}: stop it, or pass another --cni-socket",
            path.display()
        ),
        Ok(_) => std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?,
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("listening on --cni-socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} its owner's only", path.display()))?;
    Ok(listener)
}

/// Requests the agent answered, and how many of those answers were errors.
#[derive(Default)]
pub struct Tally {
    pub answered: AtomicU64,
    pub failed: AtomicU64,
}

/// Threads waiting in `accept` for the next request: a request is served
/// by a thread already running (a thread started for it would first wait
/// for a CPU behind whatever runs on the node), and each thread serves
/// one request and ends, its successor started after its answer. At most
/// this many requests run at once; more wait in the socket's backlog.
const SPARES: usize = 8;

/// The agent's server of plugin commands (see the module's doc).
pub struct Server {
    listener: std::os::unix::net::UnixListener,
    tally: Tally,
    /// Threads waiting in `accept`.
    waiting: AtomicUsize,
    /// Requests being done.
    busy: AtomicUsize,
    stopping: AtomicBool,
}

impl Server {
    /// Serves on `listener` (from [`bind`]) with [`SPARES`] threads.
    pub fn start(listener: std::os::unix::net::UnixListener) -> Arc<Self> {
        let server = Arc::new(Self {
            listener,
            tally: Tally::default(),
            waiting: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        });
        server.top_up();
        server
    }

    /// The requests answered so far.
    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// Starts threads until [`SPARES`] wait (after a failed start, at the
    /// next call: the agent calls it every second).
    pub fn top_up(self: &Arc<Self>) {
        while !self.stopping.load(Ordering::SeqCst)
            && self.waiting.load(Ordering::SeqCst) + self.busy.load(Ordering::SeqCst) < SPARES
        {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let server = self.clone();
            let started = std::thread::Builder::new()
                .name("cni-request".into())
                .spawn(move || server.serve_one());
            if let Err(err) = started {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                eprintln!("redirect: node agent: no thread for CNI requests: {err}");
                return;
            }
        }
    }

    /// One thread's life: waits for a request, answers it, starts its
    /// successor and ends (it may be in the pod's network namespace).
    fn serve_one(self: Arc<Self>) {
        let accepted = loop {
            match self.listener.accept() {
                _ if self.stopping.load(Ordering::SeqCst) => break None,
                Ok((stream, _)) => break Some(stream),
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => {
                    // Out of descriptors, say: the plugin waits, or does
                    // the command itself after its timeout.
                    eprintln!("redirect: node agent: accepting a CNI request: {err}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        self.busy.fetch_add(1, Ordering::SeqCst);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        if let Some(stream) = accepted {
            answer(&stream, &self.tally);
        }
        self.busy.fetch_sub(1, Ordering::SeqCst);
        self.top_up();
    }

    /// Stops taking requests (the plugin does them itself from now on)
    /// and waits up to `grace` for those under way: each holds the
    /// signals that would stop it until it is done.
    pub fn stop(&self, socket: &Path, grace: Duration) -> bool {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(socket);
        // Wakes the threads waiting in accept.
        // SAFETY: shutdown on a descriptor this server owns.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let deadline = std::time::Instant::now() + grace;
        while self.busy.load(Ordering::SeqCst) > 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

/// Answers the one request on `stream`, on the calling thread, which it
/// may move into the pod's network namespace: call it on a thread of its
/// own that ends after it. A request it cannot read, or from a peer that
/// is neither root nor this process's user, is closed unanswered.
pub fn answer(stream: &UnixStream, tally: &Tally) {
    let reply = match read_request(stream) {
        Ok((request, netns)) => run(request, netns),
        Err(why) => {
            // Closed unanswered: the plugin does the command itself.
            eprintln!("redirect: node agent: a CNI request not taken: {why}");
            return;
        }
    };
    tally.answered.fetch_add(1, Ordering::Relaxed);
    if reply.error.is_some() {
        tally.failed.fetch_add(1, Ordering::Relaxed);
    }
    if let Ok(text) = serde_json::to_vec(&reply) {
        let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
        let _ = (&*stream).write_all(&text);
    }
}

/// The request and the namespace descriptor sent with it, from a peer
/// that is root or this process's user.
fn read_request(stream: &UnixStream) -> Result<(Request, Option<OwnedFd>), String> {
    let uid = peer_uid(stream).map_err(|err| format!("the peer's credentials: {err}"))?;
    // SAFETY: geteuid has no preconditions.
    if !may_ask(uid, unsafe { libc::geteuid() }) {
        return Err(format!(
            "uid {uid} may not ask: the agent answers root (the runtime running the plugin)"
        ));
    }
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(|err| err.to_string())?;
    let mut body = vec![0u8; 64 * 1024];
    let (first, fds) = recv_with_fds(stream, &mut body).map_err(|err| err.to_string())?;
    body.truncate(first);
    stream
        .take((LIMIT - first) as u64)
        .read_to_end(&mut body)
        .map_err(|err| format!("reading the request: {err}"))?;
    if body.len() >= LIMIT {
        return Err(format!("the request is longer than {LIMIT} bytes"));
    }
    let mut fds = fds.into_iter();
    let netns = fds.next();
    if fds.next().is_some() {
        return Err("more than one descriptor came with the request".into());
    }
    let request = serde_json::from_slice(&body).map_err(|err| format!("the request: {err}"))?;
    Ok((request, netns))
}

/// Whether a peer of uid `uid` may ask an agent running as `own`: root
/// (the runtime runs the plugin as root) or the agent's own user.
fn may_ask(uid: u32, own: u32) -> bool {
    uid == 0 || uid == own
}

/// Runs the request's command with the pod's namespace as `netns`.
fn run(request: Request, netns: Option<OwnedFd>) -> Reply {
    let error = |code, msg: &str, details: String| Reply {
        result: None,
        error: Some(WireError {
            code,
            msg: msg.into(),
            details,
        }),
        timing: String::new(),
    };
    let path = match &netns {
        Some(fd) => format!("/proc/self/fd/{}", fd.as_raw_fd()),
        None if request.command == "DEL" => String::new(),
        None => {
            return error(
                code::INVALID_ENVIRONMENT,
                "the plugin sent no network namespace",
                format!("{} needs the pod's namespace", request.command),
            );
        }
    };
    let inv = Invocation {
        command: request.command,
        container_id: request.container_id,
        netns: path.clone(),
        ifname: request.ifname,
        args: request.args,
        config: request.config,
    };
    crate::ebpf::timing::start_if(request.timing);
    let outcome = super::plugin::run(&inv);
    let timing = crate::ebpf::timing::take();
    drop(netns);
    // Messages name the namespace as the runtime did.
    let named = |text: String| {
        if path.is_empty() {
            text
        } else {
            text.replace(&path, &request.netns)
        }
    };
    match outcome {
        Ok(result) => Reply {
            result,
            error: None,
            timing,
        },
        Err(err) => Reply {
            result: None,
            error: Some(WireError {
                code: err.code,
                msg: named(err.msg),
                details: named(err.details),
            }),
            timing,
        },
    }
}

/// The uid of the process at the other end of `stream`.
fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Room for the control message of one descriptor, aligned for `cmsghdr`.
#[repr(C)]
union Control {
    header: libc::cmsghdr,
    bytes: [u8; 64],
}

/// Sends (the first part of) `body` with `fd` attached: how many bytes
/// went.
fn send_with_fd(stream: &UnixStream, body: &[u8], fd: Option<RawFd>) -> std::io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: body.as_ptr().cast_mut().cast(),
        iov_len: body.len(),
    };
    let mut control = Control { bytes: [0; 64] };
    // SAFETY: zeroed msghdr is valid; every pointer set below outlives the
    // sendmsg call, and the control message is written within `control`.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        if let Some(fd) = fd {
            let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
            msg.msg_control = (&raw mut control).cast();
            msg.msg_controllen = space;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            libc::CMSG_DATA(cmsg).cast::<RawFd>().write_unaligned(fd);
        }
        libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    usize::try_from(sent).map_err(|_| std::io::Error::last_os_error())
}

/// Receives into `buf` what the first read gives, and the descriptors
/// that came with it (closed when dropped; close-on-exec).
fn recv_with_fds(stream: &UnixStream, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = Control { bytes: [0; 64] };
    let mut fds = Vec::new();
    // SAFETY: as in send_with_fd; the kernel writes at most
    // msg_controllen bytes of control messages, which are read only
    // through the CMSG macros within it.
    let got = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = (&raw mut control).cast();
        msg.msg_controllen = std::mem::size_of::<Control>();
        let got = libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if got >= 0 {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                    let len = (*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
            if msg.msg_flags & libc::MSG_CTRUNC != 0 {
                return Err(std::io::Error::other(
                    "more descriptors came with the request than one",
                ));
            }
        }
        got
    };
    let got = usize::try_from(got).map_err(|_| std::io::Error::last_os_error())?;
    Ok((got, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invocation(command: &str, netns: &str) -> Invocation {
        Invocation {
            command: command.into(),
            container_id: "c1".into(),
            netns: netns.into(),
            ifname: "eth0".into(),
            args: BTreeMap::from([("K8S_POD_NAME".into(), "p".into())]),
            config: serde_json::json!({"cniVersion": "1.0.0"}),
        }
    }

    #[test]
    fn a_request_crosses_with_its_namespace_descriptor() {
        let (plugin, agent) = UnixStream::pair().unwrap();
        let netns = File::open("/proc/self/ns/net").unwrap();
        let body = br#"{"hello":1}"#;
        let sent = send_with_fd(&plugin, body, Some(netns.as_raw_fd())).unwrap();
        assert_eq!(sent, body.len());
        let mut buf = [0u8; 64];
        let (got, fds) = recv_with_fds(&agent, &mut buf).unwrap();
        assert_eq!(&buf[..got], body);
        assert_eq!(fds.len(), 1);
        // The same namespace: the same inode through the received descriptor.
        use std::os::unix::fs::MetadataExt as _;
        let received = std::fs::metadata(format!("/proc/self/fd/{}", fds[0].as_raw_fd())).unwrap();
        assert_eq!(received.ino(), netns.metadata().unwrap().ino());
    }

    #[test]
    fn only_root_or_the_agents_own_user_may_ask() {
        assert!(may_ask(0, 0) && may_ask(0, 1000) && may_ask(1000, 1000));
        assert!(!may_ask(1000, 0) && !may_ask(1337, 1000));
    }

    #[test]
    fn a_request_without_a_descriptor_is_only_a_del() {
        let reply = run(
            Request {
                command: "ADD".into(),
                container_id: "c1".into(),
                netns: "/var/run/netns/x".into(),
                ifname: "eth0".into(),
                args: BTreeMap::new(),
                config: serde_json::json!({}),
                timing: false,
            },
            None,
        );
        assert_eq!(reply.error.map(|e| e.code), Some(code::INVALID_ENVIRONMENT));
    }

    #[test]
    fn the_plugin_does_it_itself_when_no_agent_listens_or_the_namespace_cannot_be_opened() {
        let missing =
            std::env::temp_dir().join(format!("redirect-no-agent-{}", std::process::id()));
        let why = ask(&missing, &invocation("ADD", "/proc/self/ns/net"), false).unwrap_err();
        assert!(why.contains("connecting to"), "{why}");
        let why = ask(&missing, &invocation("ADD", "/nonexistent/netns"), false).unwrap_err();
        assert!(why.contains("opening /nonexistent/netns"), "{why}");
        let why = ask(&missing, &invocation("CHECK", ""), false).unwrap_err();
        assert!(why.contains("CNI_NETNS"), "{why}");
    }

    #[test]
    fn an_answer_is_read_back_as_the_plugins_outcome() {
        let dir = std::env::temp_dir().join(format!("redirect-agent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("cni.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let tally = Tally::default();
        let served = std::thread::scope(|s| {
            let agent = s.spawn(|| {
                let (stream, _) = listener.accept().unwrap();
                answer(&stream, &tally);
            });
            // VERSION needs no namespace and touches nothing.
            let inv = invocation("VERSION", "/proc/self/ns/net");
            let asked = ask(&socket, &inv, true);
            agent.join().unwrap();
            asked
        });
        let (outcome, timing) = served.unwrap();
        let result = outcome.unwrap().unwrap();
        assert_eq!(result["cniVersion"], "1.0.0");
        assert_eq!(timing, "");
        assert_eq!(tally.answered.load(Ordering::Relaxed), 1);
        assert_eq!(tally.failed.load(Ordering::Relaxed), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
