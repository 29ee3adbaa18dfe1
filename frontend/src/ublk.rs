//! ublk target: a [`BlockVolume`] as `/dev/ublkbN`.
//!
//! ublk is Linux's io_uring-based userspace block driver: the kernel hands
//! each block request to this process as a completed `uring_cmd`, and the
//! answer goes back as the next one. There is one io_uring per hardware
//! queue, each driven by its own thread (created by libublk), and one
//! long-lived task per tag (request slot) on that thread's local executor:
//! fetch a request, serve it, commit the result and fetch the next.
//!
//! The volume, however, lives on the engine's tokio runtime. A request is
//! therefore handed to tokio as a task, and its answer comes back through a
//! oneshot channel. The queue thread spends its idle time blocked in
//! `io_uring_enter`, where a waker from another thread cannot reach it, so
//! each queue also keeps a read of an eventfd in flight in its ring: a
//! tokio task first sends its answer (which schedules the tag's task on the
//! local executor) and only then bumps the eventfd, so that by the time the
//! queue thread wakes up the answer is there to be taken.
//!
//! Lifecycle:
//! - **Start** creates the device (any free id, or the one asked for) with
//!   4 KiB or 512 B logical blocks, a volatile write cache with FUA (so the
//!   kernel sends FLUSH and FUA, which map to the volume's flush), and
//!   discard and write-zeroes limits.
//! - **User recovery.** With `user_recovery` on, a device whose engine died
//!   is kept by the kernel in the QUIESCED state with its requests held
//!   (and those in flight re-issued: `UBLK_F_USER_RECOVERY_REISSUE`, safe
//!   here because every request is idempotent). A later start with the
//!   same id finds it and re-attaches: the file system on it sees a pause,
//!   not an error.
//! - **Stale devices.** A device with the requested id whose server is gone
//!   and which cannot be recovered (recovery off, or it is DEAD) is deleted
//!   with a warning and created afresh; one whose server still runs is
//!   refused.
//! - **Stop** (clean) stops and deletes the device after the kernel has
//!   drained it.
//!
//! The engine must not share its mount namespace with whoever mounts the
//! device: if it held a reference to a mount of its own device, deleting
//! the device at exit would wait on itself. [`isolate_mount_namespace`]
//! does that and must run before any thread is started.

use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use io_uring::{opcode, types};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{sys, BufDesc, UblkError, UblkFlags};

use crate::{BlockVolume, VolumeError};

const CONTROL_DEVICE: &str = "/dev/ublk-control";

/// How the device is created.
#[derive(Debug, Clone)]
pub struct UblkConfig {
    /// Device id (`/dev/ublkbN`); `None` takes any free one.
    pub id: Option<u32>,
    pub queues: u16,
    pub depth: u16,
    /// Logical block size: 4096 (default) or 512.
    pub logical_block_size: u32,
    /// Keep the device through an engine crash so a new engine can take
    /// it over (see the module docs).
    pub user_recovery: bool,
}

impl Default for UblkConfig {
    fn default() -> Self {
        UblkConfig {
            id: None,
            queues: std::thread::available_parallelism()
                .map(|n| n.get() as u16)
                .unwrap_or(1),
            depth: 128,
            logical_block_size: 4096,
            user_recovery: true,
        }
    }
}

/// The device being served.
#[derive(Debug, Clone)]
pub struct UblkDevice {
    pub id: u32,
    pub path: String,
    /// An existing device was taken over rather than created.
    pub recovered: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum UblkTargetError {
    #[error("this kernel offers no ublk ({CONTROL_DEVICE} is missing; try `modprobe ublk_drv`)")]
    Unavailable,
    #[error("invalid ublk configuration: {0}")]
    Config(String),
    #[error("ublk device {id} is still served by running process {pid}")]
    InUse { id: u32, pid: i32 },
    #[error("ublk device {id}: {what}: {source}")]
    Control {
        id: i64,
        what: &'static str,
        source: UblkError,
    },
    #[error("ublk target thread failed: {0}")]
    Thread(String),
}

fn control(id: i64, what: &'static str) -> impl FnOnce(UblkError) -> UblkTargetError {
    move |source| UblkTargetError::Control { id, what, source }
}

/// Puts this process in a mount namespace of its own (mounts private), so
/// it never holds a reference to a mount of the device it serves. Call it
/// before starting any thread: the kernel refuses for threaded processes.
pub fn isolate_mount_namespace() -> std::io::Result<()> {
    // SAFETY: plain syscalls with valid, NUL-terminated arguments.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let root = c"/";
        let none = c"none";
        if libc::mount(
            none.as_ptr(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A running ublk target. Dropping it without [`stop`](Self::stop) leaves
/// the device to the kernel (recoverable when user recovery is on).
pub struct UblkTarget {
    device: UblkDevice,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UblkTarget {
    /// Creates or recovers the device and serves `volume` on it, running
    /// the volume's futures on `runtime`. Returns once the device is live.
    pub fn start<V: BlockVolume>(
        volume: Arc<V>,
        runtime: tokio::runtime::Handle,
        cfg: &UblkConfig,
    ) -> Result<UblkTarget, UblkTargetError> {
        if !std::path::Path::new(CONTROL_DEVICE).exists() {
            return Err(UblkTargetError::Unavailable);
        }
        let lbs_shift = match cfg.logical_block_size {
            512 => 9,
            4096 => 12,
            n => {
                return Err(UblkTargetError::Config(format!(
                    "logical block size {n}: 512 or 4096"
                )))
            }
        };
        let size = volume.size();
        if !size.is_multiple_of(cfg.logical_block_size as u64) {
            return Err(UblkTargetError::Config(format!(
                "volume size {size} is not a multiple of the {}-byte block",
                cfg.logical_block_size
            )));
        }
        if cfg.queues == 0 || cfg.depth == 0 {
            return Err(UblkTargetError::Config(
                "queues and depth must be at least 1".into(),
            ));
        }
        let recover = match cfg.id {
            Some(id) => prepare_existing(id, cfg.user_recovery)?,
            None => false,
        };
        let id = cfg.id.map(|i| i as i32).unwrap_or(-1);
        let mut flags = sys::UBLK_F_CMD_IOCTL_ENCODE as u64;
        if cfg.user_recovery {
            flags |= (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
        }
        let dev_flags = if recover {
            UblkFlags::UBLK_DEV_F_RECOVER_DEV
        } else {
            UblkFlags::UBLK_DEV_F_ADD_DEV
        };
        let (queues, depth) = (cfg.queues, cfg.depth);

        // The control handle is not Send: it is built, used and dropped on
        // the target's own thread, which reports back once the device is
        // live (or failed).
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ublk-target".into())
            .spawn(move || {
                let fail = ready_tx.clone();
                let ctrl = match UblkCtrlBuilder::default()
                    .name("rvol")
                    .id(id)
                    .nr_queues(queues)
                    .depth(depth)
                    .ctrl_flags(flags)
                    .dev_flags(dev_flags)
                    .build()
                {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = fail.send(Err(control(id as i64, "creating")(e)));
                        return;
                    }
                };
                let dev_id = ctrl.dev_info().dev_id;
                if recover {
                    if let Err(e) = ctrl.start_user_recover() {
                        let _ = fail.send(Err(control(dev_id as i64, "starting recovery")(e)));
                        return;
                    }
                }
                let set_params = move |dev: &mut UblkDev| {
                    set_params(dev, size, lbs_shift);
                    Ok(())
                };
                let serve = move |qid: u16, dev: &UblkDev| {
                    serve_queue(qid, dev, volume.clone(), runtime.clone())
                };
                let live = move |ctrl: &UblkCtrl| {
                    let _ = ready_tx.send(Ok(UblkDevice {
                        id: ctrl.dev_info().dev_id,
                        path: ctrl.get_bdev_path(),
                        recovered: recover,
                    }));
                };
                if let Err(e) = ctrl.run_target(set_params, serve, live) {
                    let _ = fail.send(Err(control(dev_id as i64, "serving")(e)));
                }
                // The queues are down. A recovered device is not owned by
                // this handle, so delete it explicitly; deleting twice is
                // harmless.
                if let Err(e) = ctrl.del_dev() {
                    tracing::debug!(id = dev_id, error = %e, "deleting the ublk device");
                }
            })
            .map_err(|e| UblkTargetError::Thread(e.to_string()))?;
        match ready_rx.recv() {
            Ok(Ok(device)) => {
                tracing::info!(id = device.id, path = %device.path, recovered = device.recovered, queues, depth, "ublk device live");
                Ok(UblkTarget {
                    device,
                    thread: Some(thread),
                })
            }
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(UblkTargetError::Thread(
                    "the target thread ended before the device was live".into(),
                ))
            }
        }
    }

    pub fn device(&self) -> &UblkDevice {
        &self.device
    }

    /// Stops and deletes the device. Blocks until the kernel has drained
    /// it, so call it where the volume's runtime can still serve requests
    /// (e.g. from `spawn_blocking`).
    pub fn stop(mut self) -> Result<(), UblkTargetError> {
        let id = self.device.id;
        let ctrl = UblkCtrl::new_simple(id as i32).map_err(control(id as i64, "opening"))?;
        ctrl.kill_dev().map_err(control(id as i64, "stopping"))?;
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| UblkTargetError::Thread("the target thread panicked".into()))?;
        }
        Ok(())
    }
}

/// Looks at an existing device with the requested id. Returns whether to
/// recover it; deletes it if it is stale and cannot be recovered.
fn prepare_existing(id: u32, user_recovery: bool) -> Result<bool, UblkTargetError> {
    if !std::path::Path::new(&format!("/dev/ublkc{id}")).exists() {
        return Ok(false);
    }
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(control(id as i64, "opening"))?;
    let info = ctrl.dev_info();
    let pid = info.ublksrv_pid;
    // SAFETY: kill with signal 0 only checks that the process exists.
    let server_alive = pid > 0 && unsafe { libc::kill(pid, 0) } == 0;
    let recoverable = info.flags & sys::UBLK_F_USER_RECOVERY as u64 != 0;
    match info.state as u32 {
        sys::UBLK_S_DEV_QUIESCED if user_recovery && recoverable => {
            tracing::warn!(
                id,
                old_pid = pid,
                "recovering ublk device left by an engine that died"
            );
            Ok(true)
        }
        sys::UBLK_S_DEV_LIVE if server_alive && pid != std::process::id() as i32 => {
            Err(UblkTargetError::InUse { id, pid })
        }
        state => {
            tracing::warn!(
                id,
                state,
                old_pid = pid,
                "deleting stale ublk device left by an earlier engine"
            );
            ctrl.kill_dev().ok();
            ctrl.del_dev()
                .map_err(control(id as i64, "deleting stale device"))?;
            Ok(false)
        }
    }
}

fn set_params(dev: &mut UblkDev, size: u64, lbs_shift: u8) {
    dev.set_default_params(size);
    let p = &mut dev.tgt.params;
    p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
    p.basic.attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    p.basic.logical_bs_shift = lbs_shift;
    p.basic.physical_bs_shift = 12;
    p.basic.io_min_shift = 12;
    p.basic.io_opt_shift = 12;
    p.discard.discard_granularity = 4096;
    // Large discards are cheap (hole punches), but keep one request's work
    // bounded: 1 GiB.
    p.discard.max_discard_sectors = 1 << 21;
    p.discard.max_write_zeroes_sectors = 1 << 21;
    p.discard.max_discard_segments = 1;
}

/// Wakes a queue thread blocked in `io_uring_enter` (see the module docs).
struct Wakeup(OwnedFd);

impl Wakeup {
    fn new() -> std::io::Result<Wakeup> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(Wakeup(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn notify(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd. A full
        // counter (EAGAIN) already means "wake up".
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

/// Keeps a read of the eventfd in flight on this thread's ring, so that a
/// `notify` from a tokio thread ends the queue thread's wait.
async fn drain_wakeups(fd: RawFd) {
    // The kernel may write here after this task is dropped with the queue,
    // so the buffer lives as long as the process (8 bytes per queue).
    let counter: &'static mut u64 = Box::leak(Box::new(0u64));
    loop {
        let sqe = opcode::Read::new(types::Fd(fd), (counter as *mut u64).cast(), 8).build();
        match libublk::uring_async::ublk_submit_sqe_async(
            sqe,
            libublk::UblkUringData::Target as u64,
        )
        .await
        {
            Ok(r) if r >= 0 || r == -libc::EAGAIN || r == -libc::EINTR => continue,
            _ => break,
        }
    }
}

/// What a queue thread needs to hand requests to the volume.
struct Bridge<V> {
    volume: Arc<V>,
    runtime: tokio::runtime::Handle,
    wakeup: Arc<Wakeup>,
}

impl<V: BlockVolume> Bridge<V> {
    /// Runs `op` on the tokio runtime; the returned future (polled on the
    /// queue thread) resolves with its result.
    fn call<T, F, Fut>(&self, op: F) -> impl Future<Output = Result<T, VolumeError>>
    where
        F: FnOnce(Arc<V>) -> Fut,
        Fut: Future<Output = Result<T, VolumeError>> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let work = op(self.volume.clone());
        let wakeup = self.wakeup.clone();
        self.runtime.spawn(async move {
            let _ = tx.send(work.await);
            wakeup.notify();
        });
        async move {
            rx.await
                .unwrap_or_else(|_| Err(VolumeError::Io("the engine runtime stopped".into())))
        }
    }

    /// Serves one request; returns the ublk result (bytes or -errno).
    async fn serve(&self, iod: &sys::ublksrv_io_desc, buf: &mut [u8]) -> i32 {
        // The descriptor is shared with the kernel: copy it out first.
        let (op_flags, offset) = (iod.op_flags, iod.start_sector << 9);
        let len = (iod.nr_sectors as u64) << 9;
        let fua = op_flags & sys::UBLK_IO_F_FUA != 0;
        let result = match op_flags & 0xff {
            sys::UBLK_IO_OP_READ => {
                if len > buf.len() as u64 {
                    return -libc::EINVAL;
                }
                match self
                    .call(move |v| async move { v.read(offset, len as u32).await })
                    .await
                {
                    Ok(data) if data.len() as u64 == len => {
                        buf[..data.len()].copy_from_slice(&data);
                        Ok(())
                    }
                    Ok(_) => Err(VolumeError::Io("short read".into())),
                    Err(e) => Err(e),
                }
            }
            sys::UBLK_IO_OP_WRITE => {
                if len > buf.len() as u64 {
                    return -libc::EINVAL;
                }
                let data = Bytes::copy_from_slice(&buf[..len as usize]);
                self.call(move |v| async move { v.write(offset, data, fua).await })
                    .await
            }
            sys::UBLK_IO_OP_FLUSH => self.call(|v| async move { v.flush().await }).await,
            sys::UBLK_IO_OP_DISCARD => {
                self.call(move |v| async move { v.trim(offset, len, fua).await })
                    .await
            }
            sys::UBLK_IO_OP_WRITE_ZEROES => {
                let may_punch = op_flags & sys::UBLK_IO_F_NOUNMAP == 0;
                self.call(move |v| async move { v.write_zeroes(offset, len, may_punch, fua).await })
                    .await
            }
            _ => return -libc::EOPNOTSUPP,
        };
        match result {
            Ok(())
                if matches!(
                    op_flags & 0xff,
                    sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE
                ) =>
            {
                len as i32
            }
            Ok(()) => 0,
            Err(e) => {
                tracing::warn!(offset, len, op = op_flags & 0xff, error = %e, "ublk request failed");
                match e {
                    VolumeError::Invalid(_) => -libc::EINVAL,
                    VolumeError::NoSpace(_) => -libc::ENOSPC,
                    VolumeError::Io(_) => -libc::EIO,
                }
            }
        }
    }
}

/// The per-tag loop: fetch a request, serve it, commit, repeat until the
/// queue goes down.
async fn serve_tag<V: BlockVolume>(
    q: &UblkQueue<'_>,
    tag: u16,
    bridge: &Bridge<V>,
) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let res = bridge.serve(q.get_iod(tag), buf.as_mut_slice()).await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// Body of one queue thread.
fn serve_queue<V: BlockVolume>(
    qid: u16,
    dev: &UblkDev,
    volume: Arc<V>,
    runtime: tokio::runtime::Handle,
) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!(qid, error = %e, "cannot set up ublk queue");
            return;
        }
    };
    let wakeup = match Wakeup::new() {
        Ok(w) => Arc::new(w),
        Err(e) => {
            tracing::error!(qid, error = %e, "cannot create the queue's eventfd");
            return;
        }
    };
    let bridge = Rc::new(Bridge {
        volume,
        runtime,
        wakeup: wakeup.clone(),
    });
    let exe = Rc::new(smol::LocalExecutor::new());
    let tasks: Vec<_> = q
        .tags()
        .map(|tag| {
            let (q, bridge) = (q.clone(), bridge.clone());
            exe.spawn(async move {
                match serve_tag(&q, tag, &bridge).await {
                    Ok(()) | Err(UblkError::QueueIsDown) => {}
                    Err(e) => tracing::error!(qid, tag, error = %e, "ublk tag stopped"),
                }
            })
        })
        .collect();
    let fd = wakeup.0.as_raw_fd();
    exe.spawn(drain_wakeups(fd)).detach();
    let ticker = exe.clone();
    smol::block_on(exe.run(async move {
        let run_ready = || while ticker.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ready, done).await {
            tracing::error!(qid, error = %e, "ublk queue failed");
        }
    }));
}
