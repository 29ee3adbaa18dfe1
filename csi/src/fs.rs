//! What the Node service does to a node: file systems made, mounted,
//! bind-mounted, grown and measured, through the node's own tools
//! (`blkid`, `mkfs.*`, `mount`, `resize2fs`, `xfs_growfs`), as the
//! kubelet's own volume plugins do.
//!
//! **A file system is made only on a blank device.** `blkid -p` probes the
//! device; only when it finds no signature at all is `mkfs` run. A device
//! holding another file system than asked is refused, never reformatted,
//! so a mistaken StorageClass cannot erase data.

use std::path::Path;
use std::process::Command;

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{program} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

/// The file system (or other signature) on `device`; None when blank.
pub fn probe(device: &str) -> Result<Option<String>, String> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE", device])
        .output()
        .map_err(|e| format!("blkid: {e}"))?;
    match out.status.code() {
        Some(0) => {
            let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
            // A signature without a TYPE (a partition table) is not blank.
            Ok(Some(if t.is_empty() { "unknown".into() } else { t }))
        }
        // blkid's "nothing found".
        Some(2) => Ok(None),
        _ => Err(format!(
            "blkid -p {device}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// Makes `fs` on `device` if it is blank; refuses one holding another.
pub fn format_if_blank(device: &str, fs: &str) -> Result<(), String> {
    match probe(device)? {
        None => {
            let force = if fs == "xfs" { "-f" } else { "-F" };
            run(&format!("mkfs.{fs}"), &["-q", force, device])?;
            tracing::info!(%device, %fs, "file system made on a blank device");
            Ok(())
        }
        Some(found) if found == fs => Ok(()),
        Some(found) => Err(format!(
            "{device} holds {found}, not {fs}: it is not reformatted"
        )),
    }
}

pub fn mount(device: &str, target: &Path, fs: &str, flags: &[String]) -> Result<(), String> {
    let target = target.to_string_lossy();
    let mut args = vec!["-t", fs];
    let options = flags.join(",");
    if !options.is_empty() {
        args.extend(["-o", &options]);
    }
    args.extend([device, &target]);
    run("mount", &args).map(|_| ())
}

/// Binds `source` (a directory or a device) onto `target`, read-only if
/// asked (a bind mount takes `ro` only on a remount).
pub fn bind(source: &Path, target: &Path, readonly: bool) -> Result<(), String> {
    let (s, t) = (source.to_string_lossy(), target.to_string_lossy());
    run("mount", &["--bind", &s, &t])?;
    if readonly {
        run("mount", &["-o", "remount,bind,ro", &t])?;
    }
    Ok(())
}

/// Grows the file system mounted at `path` from `device` to its size.
pub fn grow(device: &str, path: &Path) -> Result<(), String> {
    match probe(device)?.as_deref() {
        Some("xfs") => run("xfs_growfs", &[&path.to_string_lossy()]).map(|_| ()),
        Some(t) if t.starts_with("ext") => run("resize2fs", &[device]).map(|_| ()),
        other => Err(format!(
            "{device}: cannot grow a file system of type {other:?}"
        )),
    }
}

/// The size of the block device at `path`, in bytes.
pub fn device_size(path: &Path) -> Result<u64, String> {
    let out = run("blockdev", &["--getsize64", &path.to_string_lossy()])?;
    out.parse().map_err(|_| format!("blockdev said {out:?}"))
}

/// Bytes and inodes of the file system at `path`: (total, available,
/// used) of each.
pub fn usage(path: &Path) -> Result<[(u64, u64, u64); 2], String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: statvfs with a valid path and a zeroed out-struct.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(format!(
            "{}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    let bs = s.f_frsize as u64;
    let bytes = (
        s.f_blocks as u64 * bs,
        s.f_bavail as u64 * bs,
        (s.f_blocks - s.f_bfree) as u64 * bs,
    );
    let inodes = (
        s.f_files as u64,
        s.f_favail as u64,
        (s.f_files - s.f_ffree) as u64,
    );
    Ok([bytes, inodes])
}
