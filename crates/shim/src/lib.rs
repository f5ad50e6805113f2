//! containerd-shim-kata-v2.
//!
//! - [`args`]: containerd's flags;
//! - [`service`]: the Task API over a [`kata_sandbox::Sandbox`];
//! - [`io`]: containerd's FIFOs bridged to the agent's streams;
//! - [`events`]: task events forwarded to containerd;
//! - [`rootfs`]: the snapshotter's mounts and the runtime options;
//! - [`monitor`]: the monitor socket (HTTP: `/metrics`, `/agent-url`);
//! - [`metrics`]: what `/metrics` answers (shim, hypervisor, virtiofsd, agent and guest).

pub mod args;
pub mod error;
pub mod events;
pub mod hooks;
pub mod io;
pub mod metrics;
pub mod monitor;
pub mod pod;
pub mod rootfs;
pub mod service;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{invalid, step, ShimError};
use args::Args;
use protobuf::Message;

/// Environment variable carrying the socket path from `start` to the daemon.
const SOCKET_ENV: &str = "KATA_SHIM_SOCKET";
/// `ConfigPath` of the runtime options containerd wrote to `start`'s stdin, for the daemon.
pub(crate) const RUNTIME_CONFIG_ENV: &str = "KATA_SHIM_RUNTIME_CONFIG";
/// Directory of shim sockets (containerd's).
const SOCKET_DIR: &str = "/run/containerd/s";

/// Runs the shim.
pub fn run(args: Args) -> ExitCode {
    // The id names the shim's socket, state and monitor directories: check it first.
    if !args.id.is_empty() && !kata_sandbox::ids::is_valid(&args.id) {
        eprintln!(
            "containerd-shim-kata-v2: {}",
            kata_sandbox::SandboxError::InvalidId {
                kind: "task",
                id: args.id.chars().take(160).collect(),
            }
        );
        return ExitCode::FAILURE;
    }
    let result = match args.action.as_str() {
        "start" => start(&args),
        "delete" => delete(&args),
        _ => daemon(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("containerd-shim-kata-v2: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The socket of the shim of task `id` in `namespace`: named by a SHA-256 of containerd's
/// address, the namespace and the id, so the name is the same for every build of the shim (a
/// new shim binary still finds the socket of one started by the old).
pub fn socket_path(args: &Args) -> PathBuf {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for part in [&args.address, &args.namespace, &args.id] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let digest = h.finalize();
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Path::new(SOCKET_DIR).join(format!("kata-{name}.sock"))
}

/// `ConfigPath` of the runtime options containerd (1.7 and later) writes to `start`'s stdin as
/// a protobuf `Any`; none when stdin is a terminal, empty or something else.
fn runtime_options_config_path() -> Option<PathBuf> {
    use std::io::{IsTerminal, Read};
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return None;
    }
    let mut data = Vec::new();
    stdin.lock().take(1 << 20).read_to_end(&mut data).ok()?;
    let any = <protobuf::well_known_types::any::Any as protobuf::Message>::parse_from_bytes(&data)
        .ok()?;
    rootfs::config_path(Some(&any))
}

fn start(args: &Args) -> Result<(), ShimError> {
    let cwd = std::env::current_dir().map_err(step("working directory"))?;
    // A pod's application container joins the shim (and VM) of its sandbox.
    if let Ok(pod::Role::Container { sandbox_id }) = pod::role_of_bundle(&cwd) {
        let sandbox_args = Args {
            id: sandbox_id.clone(),
            ..args.clone()
        };
        let socket = socket_path(&sandbox_args);
        if std::os::unix::net::UnixStream::connect(&socket).is_err() {
            return Err(invalid(format!(
                "container {} belongs to pod sandbox {sandbox_id}, whose shim is not running ({} does not answer); create the pod's sandbox first",
                args.id,
                socket.display()
            )));
        }
        return announce(&cwd, &socket);
    }
    let socket = socket_path(args);
    std::fs::create_dir_all(SOCKET_DIR).map_err(step(format!("create {SOCKET_DIR}")))?;
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        // A shim for this task already runs: containerd reconnects to it.
        println!("unix://{}", socket.display());
        return Ok(());
    }
    let _ = std::fs::remove_file(&socket);
    let exe = std::env::current_exe().map_err(step("find own binary"))?;
    // containerd reads the shim's log from the bundle's `log` FIFO when it exists.
    let log = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags_nonblock()
        .open(cwd.join("log"))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null());
    let mut cmd = std::process::Command::new(exe);
    if let Some(path) = runtime_options_config_path() {
        cmd.env(RUNTIME_CONFIG_ENV, path);
    }
    cmd.args([
        "-namespace",
        &args.namespace,
        "-address",
        &args.address,
        "-publish-binary",
        &args.publish_binary,
        "-id",
        &args.id,
    ])
    .env(SOCKET_ENV, &socket)
    .current_dir(&cwd)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(log);
    if args.debug {
        cmd.arg("-debug");
    }
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid in the child only; the daemon must outlive containerd's call.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(step("start the shim daemon"))?;
    for _ in 0..1000 {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return announce(&cwd, &socket);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(invalid(format!(
                "the shim daemon exited ({status}) before listening on {}",
                socket.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    Err(invalid(format!(
        "the shim daemon did not listen on {} within 10 s",
        socket.display()
    )))
}

/// Tells containerd the shim's address: on stdout, and in the bundle's `address` file, which
/// containerd reads back to reconnect after it restarts.
fn announce(bundle: &Path, socket: &Path) -> Result<(), ShimError> {
    let address = format!("unix://{}", socket.display());
    std::fs::write(bundle.join("address"), &address)
        .map_err(step(format!("write {}/address", bundle.display())))?;
    println!("{address}");
    let _ = std::io::stdout().flush();
    Ok(())
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

/// `delete`: after a crash, kill the sandbox's VM, unmount and remove its state. Idempotent.
fn delete(args: &Args) -> Result<(), ShimError> {
    let bundle = if args.bundle.is_empty() {
        std::env::current_dir().map_err(step("working directory"))?
    } else {
        PathBuf::from(&args.bundle)
    };
    kata_sandbox::sandbox::cleanup_stale(&args.id);
    monitor::remove(&args.id);
    rootfs::unmount_rootfs(&bundle.join("rootfs"));
    let _ = std::fs::remove_file(socket_path(args));
    let resp = containerd_shim_protos::api::DeleteResponse {
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: protobuf::MessageField::some(events::now()),
        ..Default::default()
    };
    let bytes = resp
        .write_to_bytes()
        .map_err(step("encode DeleteResponse"))?;
    std::io::stdout()
        .write_all(&bytes)
        .map_err(step("write DeleteResponse"))?;
    Ok(())
}

/// Sets the shim's log level once the configuration is known (`[runtime] enable_debug`).
type LevelSetter = Box<dyn Fn(bool) + Send + Sync>;
static LOG_LEVEL: std::sync::OnceLock<LevelSetter> = std::sync::OnceLock::new();

/// Turns the shim's debug logging on (`[runtime] enable_debug = true`, as containerd's
/// `-debug` flag does).
pub(crate) fn set_debug_logging() {
    if let Some(set) = LOG_LEVEL.get() {
        set(true);
    }
}

fn daemon(args: &Args) -> Result<(), ShimError> {
    let socket = std::env::var_os(SOCKET_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| socket_path(args));
    let level = if args.debug { "debug" } else { "info" };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        // Each phase's span logs its duration when it closes ("close time.busy=.. time.idle=..";
        // busy + idle = wall time): the start breakdown of BENCHMARKS.md comes from these.
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_filter_reloading();
    let handle = builder.reload_handle();
    if builder.try_init().is_ok() {
        let _ = LOG_LEVEL.set(Box::new(move |debug: bool| {
            let _ = handle.reload(tracing_subscriber::EnvFilter::new(if debug {
                "debug"
            } else {
                "info"
            }));
        }));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(step("start the async runtime"))?;
    let result = rt.block_on(async move {
        let publisher =
            events::Publisher::new(std::env::var("TTRPC_ADDRESS").ok(), args.namespace.clone());
        let shutdown = Arc::new(tokio::sync::Notify::new());
        let service = Arc::new(service::Service::new(
            args.id.clone(),
            publisher,
            shutdown.clone(),
        ));
        // The monitor socket (metrics, agent URL); a failure to serve it is logged, never fatal.
        let monitor = match monitor::start(&args.id, service.clone()) {
            Ok(task) => Some(task),
            Err(e) => {
                tracing::warn!(error = %e, "monitor socket not served");
                None
            }
        };
        let mut services = containerd_shim_protos::shim_async::create_task(service.clone());
        // containerd 2.x's sandbox API, for a runtime with `sandboxer = "shim"`.
        services.extend(containerd_shim_protos::sandbox_async::create_sandbox(
            service.clone(),
        ));
        // containerd 1.6 calls containerd.task.v2.Task; 2.x calls v3. Serve both.
        for (_, svc) in containerd_shim_protos::shim_async::create_task(service) {
            services.insert("containerd.task.v2.Task".to_string(), svc);
        }
        let _ = std::fs::remove_file(&socket);
        let mut server = ttrpc::asynchronous::Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .map_err(step(format!("listen on {}", socket.display())))?
            .register_service(services);
        server.start().await.map_err(step("serve"))?;
        tracing::info!(socket = %socket.display(), "shim serving");
        shutdown.notified().await;
        // Let the Shutdown reply go out, then stop serving (bounded: containerd may keep its
        // connection open).
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = tokio::time::timeout(Duration::from_millis(500), server.shutdown()).await;
        let _ = std::fs::remove_file(&socket);
        if let Some(task) = monitor {
            task.abort();
        }
        monitor::remove(&args.id);
        Ok::<(), ShimError>(())
    });
    // Blocking FIFO opens that never completed (a stdin nobody wrote) must not keep the shim
    // alive.
    rt.shutdown_background();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_name_is_a_stable_hash() {
        // sha256("/run/containerd/containerd.sock\0default\0abc\0"), first 8 bytes: the same
        // with every Rust release and every build (DefaultHasher is neither).
        let args = Args {
            address: "/run/containerd/containerd.sock".into(),
            namespace: "default".into(),
            id: "abc".into(),
            ..Default::default()
        };
        assert_eq!(
            socket_path(&args),
            PathBuf::from("/run/containerd/s/kata-2b99dc7ef9eaf7a7.sock")
        );
    }
}
