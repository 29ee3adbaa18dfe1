//! Where a node keeps the keys of the encrypted volumes it serves.
//!
//! One file per volume, `DIR/VOLUME.key`, mode 0600, put there by whoever
//! brings the key to the node: the CSI node plugin from the Secret the
//! StorageClass names, when it stages the volume, or an administrator. The
//! agent passes the file to the volume's engine and holds the engine until
//! it exists. A key never goes through the store: etcd, its backups and
//! anyone who can read them learn only that a volume is encrypted.
//!
//! A key is written whole or not at all (a temporary file renamed over the
//! name), so an engine never starts on half a key.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::model::VolumeName;

/// How an engine held for its key is reported (the agent's hold reason
/// starts so): attaching answers at once with it, and the CSI driver's
/// publish goes on, as staging brings the key.
pub const WAITING: &str = "waiting for the volume's encryption key";

pub fn path(dir: &Path, volume: &VolumeName) -> PathBuf {
    dir.join(format!("{volume}.key"))
}

/// Puts `secret` in place as `volume`'s key (idempotent).
pub fn write(dir: &Path, volume: &VolumeName, secret: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = path(dir, volume);
    if std::fs::read(&path).is_ok_and(|old| old == secret) {
        return Ok(());
    }
    let tmp = dir.join(format!(".{volume}.key.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(secret)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    // The rename too: a key lost to a power cut would leave the volume
    // unreadable until staged again.
    std::fs::File::open(dir)?.sync_all()
}

/// Removes `volume`'s key from the node (nothing if it has none).
pub fn remove(dir: &Path, volume: &VolumeName) -> std::io::Result<()> {
    match std::fs::remove_file(path(dir, volume)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_is_written_private_and_whole_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let v = VolumeName::new("vol-a").unwrap();
        write(dir.path(), &v, &[7; 32]).unwrap();
        write(dir.path(), &v, &[7; 32]).unwrap();
        let p = path(dir.path(), &v);
        assert_eq!(std::fs::read(&p).unwrap(), vec![7; 32]);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        write(dir.path(), &v, &[8; 32]).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), vec![8; 32]);
        remove(dir.path(), &v).unwrap();
        remove(dir.path(), &v).unwrap();
        assert!(!p.exists());
    }
}
